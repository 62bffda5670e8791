"""Unit tests (a package so its modules get unique names: tests.unit.test_x)."""
