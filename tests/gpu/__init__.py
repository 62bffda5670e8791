"""GPU tests (a package so its modules get unique names: tests.gpu.test_x)."""
