"""Helpers shared by the test folders (data writers, hand-built batches, ports, run configs, the tiny model).

Tests import them as `from tests.helpers.<module> import ...`; no test module imports from another test module.
Scripts that tests launch in a fresh interpreter (`python tests/.../test_x.py`, sbatch jobs) get the repository root
on PYTHONPATH from their launcher, so the same import lines work there.
"""
