"""Slurm tests (a package so its modules get unique names: tests.slurm.test_x)."""
