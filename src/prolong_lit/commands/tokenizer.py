"""`python -m prolong_lit tokenizer`: build the real Llama-3 tokenizer offline into a directory.

    python -m prolong_lit tokenizer [--output DIR] [--overwrite]

The default directory is where `llama3` (the tokenizer name every config may use) is looked up; the work is
`prolong_lit.tokenizer.build_llama3_tokenizer`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from prolong_lit.commands import command_parser

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser

log = logging.getLogger(__name__)


def build_parser() -> ArgumentParser:
    """The options of `tokenizer` (also readable from a YAML file with `--config`)."""
    from prolong_lit.tokenizer import default_llama3_tokenizer_dir

    parser = command_parser("tokenizer", "Build the Llama-3 tokenizer offline into a directory.")
    parser.add_argument("--output", type=str, default=str(default_llama3_tokenizer_dir()), help="directory to write")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if the directory has one")
    return parser


def main(argv: list[str]) -> None:
    """`python -m prolong_lit tokenizer [--output DIR] [--overwrite]`."""
    from prolong_lit.tokenizer import build_llama3_tokenizer

    args = build_parser().parse_args(argv)
    path = build_llama3_tokenizer(args.output, overwrite=args.overwrite)
    log.info("Llama-3 tokenizer at %s", path)
