"""The test suite as a package, so every test module has a unique dotted name (tests.unit.test_x, ...).

pytest's default "prepend" import mode walks up from a test file through folders holding an __init__.py and puts
the first folder without one (the repository root) on sys.path; the shared helpers are then `tests.helpers.*`.
"""
