"""Distributed tests (a package so its modules get unique names: tests.distributed.test_x)."""
