"""`python -m prolong_lit prepare`: raw documents -> tokenized, filtered, packed litdata shards, one directory per
domain.

    python -m prolong_lit prepare --config configs/data/demo.yaml [--overwrite] [--output_dir X]

The options are `prolong_lit.data.prepare.PrepareConfig`'s fields (usually from a YAML file, flags override it);
the work, every check first, is `prolong_lit.data.prepare.prepare`.
"""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING

from prolong_lit.commands import command_parser
from prolong_lit.data.prepare import PrepareConfig, prepare

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser


def build_parser() -> ArgumentParser:
    """The options of `prepare`: PrepareConfig's fields and `--overwrite`."""
    from jsonargparse import ActionYesNo

    parser = command_parser(
        "prepare", "Tokenize, filter and pack raw documents into litdata shards (one directory per domain).",
        config_help="a YAML file of the settings below",
    )
    parser.add_class_arguments(PrepareConfig, as_group=False)
    parser.add_argument(
        "--overwrite", action=ActionYesNo, default=False, help="replace an existing prepared output_dir"
    )
    return parser


def parse_config(argv: list[str]) -> tuple[PrepareConfig, bool]:
    """The config and the overwrite flag from command-line arguments."""
    parser = build_parser()
    namespace = parser.instantiate(parser.parse_args(argv))
    names = [f.name for f in fields(PrepareConfig)]
    return PrepareConfig(**{name: namespace[name] for name in names}), bool(namespace.overwrite)


def main(argv: list[str]) -> None:
    """`python -m prolong_lit prepare ...`"""
    config, overwrite = parse_config(argv)
    prepare(config, overwrite=overwrite)
