"""`python -m prolong_lit <subcommand>`: wiring only (see prolong_lit.cli)."""

from prolong_lit.cli import main

if __name__ == "__main__":
    main()
