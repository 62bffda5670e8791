"""The pre-clip gradient norm computed once per optimizer step instead of twice.

Before: the module logged the norm of all gradients (`on_before_optimizer_step`) and Lightning's clipping
(`clip_grad_norm_`) computed it again. After: `LongContextLM.configure_gradient_clipping` clips with the norm
already computed (`clip_grads_with_norm_`). This times exactly those two code paths on the gradients of the
trainer-overhead model (hidden 256, 4 layers, vocabulary 8,192: 6.3M parameters, fp32), interleaved.

    python benchmarks/grad_norm_once.py
"""

from __future__ import annotations

import argparse
import time

from common import common_args, markdown_table, median, report, setup_env, small_llama_overrides, spread


def build(vocab_size: int, hidden_size: int, layers: int):
    import torch

    from prolong_lit.model.module import LongContextLM
    from prolong_lit.model.optim import param_groups
    from prolong_lit.model.settings import LlamaSettings

    torch.manual_seed(0)
    module = LongContextLM(llama=LlamaSettings(name_or_path="tiny",
                                               overrides=small_llama_overrides(vocab_size, hidden_size, layers)))
    module.configure_model()
    for param in module.model.parameters():
        param.grad = torch.randn_like(param)
    optimizer = torch.optim.AdamW(param_groups(module.model.named_parameters()))
    return module, optimizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=41)
    args = common_args(parser).parse_args(argv)
    setup_env(args.threads)
    import torch

    from prolong_lit.model.module import pre_clip_grad_norm

    module, optimizer = build(args.vocab_size, args.hidden_size, args.layers)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved = [p.grad.clone() for p in params]

    def twice() -> None:  # the former path: the logged norm, then clip_grad_norm_'s own
        torch.nn.utils.get_total_norm([p.grad for p in module.parameters() if p.grad is not None])
        torch.nn.utils.clip_grad_norm_(params, 1.0)

    def once() -> None:  # LongContextLM now: one norm, logged and reused by the clipping
        with_grad, norm = pre_clip_grad_norm(optimizer)
        torch.nn.utils.clip_grads_with_norm_(with_grad, 1.0, norm)

    times: dict[str, list[float]] = {"twice": [], "once": []}
    for _ in range(args.repeats):
        for name, run in (("twice", twice), ("once", once)):
            for param, grad in zip(params, saved):  # the same (unclipped) gradients every time
                param.grad.copy_(grad)
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    ratios = [o / t for o, t in zip(times["once"], times["twice"])]
    rows = [["norm twice (before)", f"{median(times['twice']) * 1e3:.2f}", spread([t * 1e3 for t in times["twice"]]),
             "1", "-"],
            ["norm once (after)", f"{median(times['once']) * 1e3:.2f}", spread([t * 1e3 for t in times["once"]]),
             f"{median(ratios):.3f}", spread(ratios)]]
    count = sum(p.numel() for p in params)
    notes = [f"{count / 1e6:.1f}M fp32 gradients (hidden {args.hidden_size}, {args.layers} layers, vocabulary "
             f"{args.vocab_size:,}); norm + clip to 1.0, median of {args.repeats} interleaved repetitions"]
    report("Pre-clip gradient norm once per step", markdown_table(["path", "ms", "range", "once / twice", "range"],
                                                                  rows), notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
