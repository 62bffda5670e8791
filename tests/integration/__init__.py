"""Integration tests (a package so its modules get unique names: tests.integration.test_x)."""
