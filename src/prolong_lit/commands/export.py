"""`python -m prolong_lit export`: a prolong_lit checkpoint -> a Hugging Face model directory that plain transformers
loads.

    python -m prolong_lit export --checkpoint runs/.../last.ckpt --output exports/stage1 [--tokenizer llama3]
        [--dtype bfloat16] [--overwrite]

The checkpoint is a single `.ckpt` file or a distributed (FSDP2) checkpoint directory; the work is
`prolong_lit.checkpoint.export_hf`, which checks every option before it writes anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prolong_lit.commands import command_parser

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser


def build_parser() -> ArgumentParser:
    """The options of `export` (also readable from a YAML file with `--config`)."""
    from prolong_lit.constants import DTYPES

    parser = command_parser("export", "Turn a checkpoint (file or distributed) into a Hugging Face directory.")
    parser.add_argument("--checkpoint", type=str, required=True,
                        help="a .ckpt file or a distributed-checkpoint directory")
    parser.add_argument("--output", type=str, required=True, help="the Hugging Face directory to write")
    parser.add_argument("--tokenizer", type=str | None, default=None,
                        help="tokenizer directory or `llama3` (default: the one the checkpoint records)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="weight dtype of the export")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing Hugging Face directory")
    return parser


def main(argv: list[str]) -> None:
    """`python -m prolong_lit export --checkpoint C --output DIR [--tokenizer T] [--dtype D] [--overwrite]`.

    A disk that fills or an output folder that cannot be written is one error naming `--output` (the export is
    written into a scratch folder beside it, removed on failure: nothing half-written is left)."""
    from prolong_lit.checkpoint import export_hf
    from prolong_lit.checkpoint_io import storage_error

    args = build_parser().parse_args(argv)
    try:
        export_hf(args.checkpoint, args.output, args.tokenizer, args.dtype, args.overwrite)
    except Exception as err:  # noqa: BLE001 - re-raised unless a full or read-only disk is behind it
        error = storage_error(err, args.output, "the export", "--output")
        if error is None:
            raise
        raise error from err
