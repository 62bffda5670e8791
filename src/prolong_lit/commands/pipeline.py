"""`python -m prolong_lit pipeline`: run a pipeline file's phases in order (finished phases are skipped).

    python -m prolong_lit pipeline --config configs/demo/pipeline.yaml [--run_dir DIR]

`--config` is the pipeline file itself (run_dir, paths, phases; see prolong_lit.pipeline.config). The work is
`prolong_lit.pipeline.run.run_pipeline`.
"""

from __future__ import annotations


def main(argv: list[str]) -> None:
    """Parse, load and check the pipeline file, then run it."""
    from jsonargparse import ArgumentParser

    from prolong_lit.pipeline.config import load_pipeline_config

    # --config names the pipeline file itself (its own schema, loaded and checked by load_pipeline_config)
    parser = ArgumentParser(prog="python -m prolong_lit pipeline",
                            description="Run a pipeline file's phases in order; finished phases are skipped.")
    parser.add_argument("--config", type=str, required=True, help="the pipeline file (run_dir, paths, phases)")
    parser.add_argument("--run_dir", type=str | None, default=None, help="replaces the file's run_dir")
    args = parser.parse_args(argv)
    from prolong_lit.checkpoint_io import storage_error
    from prolong_lit.pipeline.run import run_pipeline

    config = load_pipeline_config(args.config, run_dir=args.run_dir)
    try:
        run_pipeline(config)
    except Exception as err:  # noqa: BLE001 - re-raised unless a full disk or a read-only run_dir is behind it
        where = getattr(err, "filename", None) or config.run_dir
        error = storage_error(err, where, "the pipeline's files", "run_dir, or --run_dir")
        if error is None:
            raise
        raise error from err
