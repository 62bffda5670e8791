"""The tool subcommands of `python -m prolong_lit` (`prolong_lit.subcommands.TOOL_SUBCOMMANDS`), one thin module each.

    prepare    raw documents -> litdata shards     (library: prolong_lit.data.prepare)
    eval       long-context evaluation of a model   (library: prolong_lit.evals, prolong_lit.checkpoint)
    export     checkpoint -> Hugging Face directory (library: prolong_lit.checkpoint)
    tokenizer  the Llama-3 tokenizer, built offline  (library: prolong_lit.tokenizer)

Each module has `build_parser()`, a jsonargparse ArgumentParser taking its options from flags and from YAML files
given with `--config` (later flags override earlier files; `--print_config` shows the result), as `fit` does, and
`main(argv)`, which parses and calls the library. Nothing else lives here: code that another module needs belongs
to the library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser


def command_parser(
    name: str, description: str, config_action: type | None = None, config_help: str = "a YAML file of its options"
) -> ArgumentParser:
    """The parser of `python -m prolong_lit <name>`, with `--config` (a YAML file of its options; read by
    `config_action`, by default jsonargparse's ActionConfigFile) and `--print_config`."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog=f"python -m prolong_lit {name}", description=description)
    parser.add_argument("--config", action=config_action or ActionConfigFile, help=config_help)
    return parser
