"""The sections of `benchmarks/gpu/check.py`: each fills its entry's rows (dicts) and notes.

Everything here imports only what the GPU image has (torch, transformers, lightning through the module) and the
project's model/, data.collate/data.format and parallel/ packages: no litdata, jsonargparse or omegaconf.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import statistics
import time
import warnings
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from prolong_lit.data.collate import collate_samples
from prolong_lit.data.format import PackedBatch
from prolong_lit.model import attention, varlen_kernels
from prolong_lit.model.module import LongContextLM
from prolong_lit.model.settings import KernelSettings, LlamaSettings
from prolong_lit.parallel.fsdp import ShardingConfig
from prolong_lit.parallel.plan import ParallelPlan

OUT_TOL = 2e-2  # relative L2 error against the fp32 reference: a few bf16 roundings (2^-8 each)
GRAD_TOL = 3e-2
ISOLATION_TOL = 1e-3  # relative change of the other documents when one is rewritten (exact kernels: 0)
MODEL_LOSS_TOL = 1e-2
MODEL_GRAD_TOL = 5e-2
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0}
KERNEL_NAME_PATTERNS = {"fa4": r"flash|fmha|cute|cutlass|sm90|sm100", "flash": r"flash", "torch_varlen": r"flash"}


def environment(device: torch.device, args) -> dict[str, Any]:
    import transformers

    cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu (--cpu-smoke)",
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else "-",
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "kernels": varlen_kernels.available_kernels(device),
        "kernel_status": varlen_kernels.installed_summary(device),
        "auto_picks": attention.chosen_kernel(attention.AUTO, device),
    }


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp32."""
    b = b.float()
    return ((a.float() - b).norm() / b.norm().clamp(min=1e-30)).item()


def mixed_lengths(total: int, longest: int) -> list[int]:
    """Documents of 1 token up to `longest`, filled up to `total` tokens."""
    lengths = [n for n in (1, 2, 3, 7, 31, 100, 257, 1000, 1024, 4095, 8192, longest) if n <= longest]
    while sum(lengths) < total:
        lengths.append(min(total - sum(lengths), max(1, longest // 3)))
    return lengths


# -- 1. kernel parity --------------------------------------------------------------------------------------------

def run_kernel(kernel: str, q, k, v, cu, bounds, longest) -> torch.Tensor:
    """(1, T, H, D) attention of one packed row with `kernel` (docmask or a GPU kernel)."""
    if kernel == "docmask":
        return attention.docmask_attention_forward(
            None, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest,
            doc_bounds=bounds, docmask_block_size=1024)[0]
    return attention.varlen_forward(kernel, q, k, v, (cu, cu, longest, longest), 0.0, None)


def reference(q, k, v, bounds) -> torch.Tensor:
    """Each document alone through causal SDPA in fp32; (1, T, H, D)."""
    repeats = q.shape[1] // k.shape[1]
    pieces = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        kd = k[0, :, a:b].repeat_interleave(repeats, dim=0)  # (H, n, D)
        vd = v[0, :, a:b].repeat_interleave(repeats, dim=0)
        pieces.append(F.scaled_dot_product_attention(q[0, :, a:b], kd, vd, is_causal=True).transpose(0, 1))
    return torch.cat(pieces)[None]  # (1, T, H, D)


def forward_backward(fn, inputs, grad_out) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


def kernel_parity(entry, device, shapes, kernels) -> None:
    lengths = mixed_lengths(shapes["total"], shapes["longest"])
    bounds = [0, *np.cumsum(lengths).tolist()]
    total, longest = bounds[-1], max(lengths)
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    heads, kv_heads, dim = shapes["heads"], shapes["kv_heads"], shapes["head_dim"]

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.bfloat16)

    inputs = [randn(1, heads, total, dim), randn(1, kv_heads, total, dim), randn(1, kv_heads, total, dim)]
    grad_out = randn(1, total, heads, dim)
    entry["notes"].append(f"one row of {total} tokens, {len(lengths)} documents of {min(lengths)}..{longest} "
                          f"tokens; {heads}/{kv_heads} heads, head dim {dim}, bf16 inputs")
    ref_out, ref_grads = forward_backward(lambda *t: reference(*t, bounds), [t.float() for t in inputs], grad_out)
    victim = lengths.index(1000) if 1000 in lengths else len(lengths) // 2  # the document rewritten for isolation
    a, b = bounds[victim], bounds[victim + 1]
    others = torch.ones(total, dtype=torch.bool, device=device)
    others[a:b] = False
    for kernel in ["docmask", *kernels]:
        def fn(q, k, v, kernel=kernel):
            return run_kernel(kernel, q, k, v, cu, bounds, longest)

        out, grads = forward_backward(fn, inputs, grad_out)
        worst_doc = max(rel(out[0, x:y], ref_out[0, x:y]) for x, y in zip(bounds[:-1], bounds[1:]))
        row = {"kernel": kernel, "out_rel": rel(out, ref_out), "worst_doc_out_rel": worst_doc,
               **{f"d{n}_rel": rel(g, r) for n, g, r in zip("qkv", grads, ref_grads)}}
        changed = [t.clone() for t in inputs]
        for t in changed:
            t[:, :, a:b] = torch.randn(t[:, :, a:b].shape, generator=gen, device=device, dtype=t.dtype)
        out2, grads2 = forward_backward(fn, changed, grad_out)
        row["others_out_change"] = rel(out2[0, others], out[0, others])
        row["others_grad_change"] = max(rel(g2[0][:, others], g[0][:, others]) for g, g2 in zip(grads, grads2))
        row["victim_out_change"] = rel(out2[0, a:b], out[0, a:b])
        row["pass"] = (row["out_rel"] <= OUT_TOL and row["worst_doc_out_rel"] <= OUT_TOL
                       and max(row[f"d{n}_rel"] for n in "qkv") <= GRAD_TOL
                       and row["others_out_change"] <= ISOLATION_TOL and row["others_grad_change"] <= ISOLATION_TOL
                       and row["victim_out_change"] > 1e-2)
        entry["rows"].append(row)
    entry["notes"].append(f"pass: out/worst document <= {OUT_TOL}, dq/dk/dv <= {GRAD_TOL} (relative L2 against "
                          f"fp32 per-document SDPA); rewriting document {victim} ({b - a} tokens) changes the others "
                          f"by <= {ISOLATION_TOL}")


# -- the 2-layer model under FSDP2 -------------------------------------------------------------------------------

def init_world(device: torch.device) -> None:
    """A process group of one (NCCL on CUDA, gloo on CPU), as a one-GPU run of the recipe has."""
    if dist.is_initialized():
        return
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def build_model(device: torch.device, shapes, layers: int = 2) -> LongContextLM:
    """`layers` decoder layers of `shapes["size"]`, FSDP2 over a world of 1: bf16 parameters for compute, fp32
    master weights and gradient reduction, full activation checkpointing (the recipe's settings)."""
    from torch.distributed.device_mesh import init_device_mesh

    init_world(device)
    plan = ParallelPlan(shard_mesh=init_device_mesh(device.type, (1,)), activation_checkpointing="full",
                        sharding=ShardingConfig(param_dtype="bfloat16", reduce_dtype="float32"))
    module = LongContextLM(llama=LlamaSettings(name_or_path=shapes["size"], overrides={"num_hidden_layers": layers},
                                               max_position_embeddings=max(shapes["lengths"])),
                           kernels=KernelSettings(attn_implementation="docmask", loss_chunk_size=2048))
    module.set_parallel_plan(plan)
    torch.manual_seed(0)
    with torch.device(device):  # as Lightning's init context: built on the device, then sharded
        module.configure_model()
    module.model.train()
    return module


def set_kernel(module: LongContextLM, kernel: str) -> None:
    """Switch the model's attention (transformers looks the function and the mask up by this name on every call),
    in every config object its modules hold."""
    configs = {id(m.config): m.config for m in module.model.modules() if getattr(m, "config", None) is not None}
    for config in configs.values():
        config._attn_implementation = attention.ATTN_IMPLEMENTATIONS[kernel]


def model_batch(length: int, vocab: int, device: torch.device, seed: int = 0) -> PackedBatch:
    """One packed row of `length` tokens: documents of L/2, L/4, ... tokens (>= 64) and the remainder."""
    lengths, left = [], length
    while left > 2 * 64:
        lengths.append(left // 2)
        left -= left // 2
    lengths.append(left)
    ids = np.random.default_rng(seed).integers(0, vocab, size=length).astype(np.int32)
    batch = collate_samples([{"input_ids": ids, "doc_lengths": np.asarray(lengths, dtype=np.int32)}], [0], [0])
    return PackedBatch(**{f.name: _to(getattr(batch, f.name), device) for f in dataclasses.fields(batch)})


def _to(value, device):
    return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value


def train_step(module: LongContextLM, batch: PackedBatch) -> torch.Tensor:
    """Forward and backward of the token-mean loss (no optimizer step); the loss, detached."""
    module.model.zero_grad(set_to_none=True)
    loss_sum, count = module.compute_loss_sum(batch)
    loss = loss_sum / count
    loss.backward()
    return loss.detach()


def _grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.to_local().detach().float().clone() for n, p in module.model.named_parameters()}


def model_parity(entry, device, shapes, kernels) -> LongContextLM:
    module = build_model(device, shapes)
    batch = model_batch(shapes["model_len"], module.hf_config.vocab_size, device)
    params = sum(p.numel() for p in module.model.parameters()) / 1e9
    entry["notes"].append(f"{shapes['size']} width, 2 layers, {params:.2f}B parameters; one row of "
                          f"{shapes['model_len']} tokens, documents "
                          f"{np.diff(batch.doc_bounds).tolist()}; pass: loss <= {MODEL_LOSS_TOL}, gradients <= "
                          f"{MODEL_GRAD_TOL} (relative L2 over all parameters) against docmask")
    set_kernel(module, "docmask")
    ref_loss = train_step(module, batch)
    ref = _grads(module)
    ref_norm = torch.sqrt(sum(g.square().sum() for g in ref.values()))
    others = kernels if device.type == "cuda" else ["sdpa"]  # CPU smoke: transformers' own packed mask
    for kernel in others:
        set_kernel(module, kernel)
        loss = train_step(module, batch)
        grads = _grads(module)
        diff = torch.sqrt(sum((grads[n] - g).square().sum() for n, g in ref.items()))
        worst = max(ref, key=lambda n: rel(grads[n], ref[n]))
        row = {"kernel": kernel, "loss": loss.item(), "docmask_loss": ref_loss.item(),
               "loss_rel": abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()),
               "grad_rel_l2": (diff / ref_norm).item(), "worst_param": worst,
               "worst_rel": rel(grads[worst], ref[worst])}
        row["pass"] = row["loss_rel"] <= MODEL_LOSS_TOL and row["grad_rel_l2"] <= MODEL_GRAD_TOL
        entry["rows"].append(row)
    module.model.zero_grad(set_to_none=True)
    return module


# -- 3. syncs and kernel names -----------------------------------------------------------------------------------

def count_syncs(fn) -> tuple[int, list[str]]:
    """Host syncs `fn` makes, by torch.cuda.set_sync_debug_mode('warn'), and where the first ones are."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    places = sorted({f"{os.path.basename(w.filename)}:{w.lineno}" for w in syncs})
    return len(syncs), places[:4]


def attention_kernel_names(fn, device) -> list[str]:
    """The profiler's kernel (CUDA) or operator (CPU) names that look like attention, longest first."""
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if re.search(r"flash|fmha|attn|attention|sdpa|varlen", e.key, re.I)]
    timed = sorted(events, key=lambda e: -(getattr(e, "device_time_total", 0) or e.cpu_time_total))
    return [e.key[:90] for e in timed[:4]]


def syncs_and_kernel_names(entry, device, shapes, kernels, module) -> None:
    module = module if module is not None else build_model(device, shapes)
    batch = model_batch(shapes["model_len"], module.hf_config.vocab_size, device, seed=1)
    for kernel in ["docmask", *kernels]:
        set_kernel(module, kernel)
        train_step(module, batch)  # warm: first-call compilation (FA4's CuTe kernels) is not a step's cost
        row = {"kernel": kernel}
        if device.type == "cuda":
            row["host_syncs_per_step"], row["sync_sites"] = count_syncs(lambda: train_step(module, batch))
        else:
            row["host_syncs_per_step"] = "n/a (CPU)"
        names = attention_kernel_names(lambda: train_step(module, batch), device)
        row["attention_kernels"] = "; ".join(names)
        if kernel in KERNEL_NAME_PATTERNS:
            row["pass"] = any(re.search(KERNEL_NAME_PATTERNS[kernel], n, re.I) for n in names)
        entry["rows"].append(row)
    module.model.zero_grad(set_to_none=True)
    entry["notes"].append("one forward + backward of the 2-layer model; the batch carries host-side document "
                          "bounds (the collate's), so attention reads nothing back from the GPU")


# -- 4. throughput -----------------------------------------------------------------------------------------------

def model_flops(module: LongContextLM, batch: PackedBatch) -> tuple[float, float]:
    """Training FLOPs of one step (3 x forward, recomputation not counted): (per-document attention, dense)."""
    config = module.hf_config
    matmul = sum(p.numel() for n, p in module.model.named_parameters() if "embed_tokens" not in n)
    tokens = int(batch.input_ids.numel())
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layers, q_dim = config.num_hidden_layers, config.num_attention_heads * head_dim
    lengths = np.diff(batch.doc_bounds).astype(np.float64)
    per_doc = 12 * layers * q_dim * float((lengths * (lengths + 1) / 2).sum())  # causal, per document
    dense = 12 * layers * q_dim * batch.input_ids.shape[1] * tokens  # torchtitan's convention: full L x L
    return 6 * matmul * tokens + per_doc, 6 * matmul * tokens + dense


def peak_tflops(device, args) -> float | None:
    if args.peak_tflops or device.type != "cuda":
        return args.peak_tflops
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def time_steps(module, batch, steps: int, device) -> list[float]:
    seconds = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(module, batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds


def throughput(entry, device, shapes, kernels, module, report, args) -> None:
    module = module if module is not None else build_model(device, shapes)
    peak = peak_tflops(device, args)
    for length in shapes["lengths"]:
        batch = model_batch(length, module.hf_config.vocab_size, device, seed=2)
        doc_flops, dense_flops = model_flops(module, batch)
        for kernel in ["docmask", *kernels]:
            if report.left() < 15:
                entry["rows"].append({"kernel": kernel, "seq_len": length, "status": "skipped: budget"})
                continue
            set_kernel(module, kernel)
            train_step(module, batch)  # warm-up
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = time_steps(module, batch, args.steps, device)
            median = statistics.median(seconds)
            row = {"kernel": kernel, "seq_len": length, "step_s": median, "spread_s": max(seconds) - min(seconds),
                   "tokens_per_s": length / median}
            if device.type == "cuda":
                row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            if peak:
                row["mfu_per_doc"] = doc_flops / median / (peak * 1e12)
                row["mfu_dense"] = dense_flops / median / (peak * 1e12)
            entry["rows"].append(row)
    module.model.zero_grad(set_to_none=True)
    entry["notes"].append(f"forward + backward (no optimizer step) of the 2-layer model, FSDP2 bf16, full "
                          f"activation checkpointing; median of {args.steps} steps after 1 warm-up; documents "
                          "L/2, L/4, ... per row; MFU per document = causal attention FLOPs of each document, "
                          f"dense = torchtitan's L x L convention; peak {peak} TFLOP/s")


# -- 5. 32 layers, extrapolated ----------------------------------------------------------------------------------

def extrapolate_32_layers(entry, device, shapes, module, args) -> None:
    """Step time and FLOPs at the longest length with 2 and 4 layers (auto's kernel), extrapolated linearly in the
    number of layers to Llama-3-8B's 32: tokens/s per GPU and MFU of the whole model on one GPU's share."""
    kernel = attention.chosen_kernel(attention.AUTO, device)
    length = max(shapes["lengths"])
    module = module if module is not None else build_model(device, shapes)
    measured = {}
    for layers in (2, 4):
        if layers == 4:
            module.model.zero_grad(set_to_none=True)
            module = build_model(device, shapes, layers=4)
        batch = model_batch(length, module.hf_config.vocab_size, device, seed=2)
        set_kernel(module, kernel)
        train_step(module, batch)  # warm-up
        measured[layers] = (statistics.median(time_steps(module, batch, args.steps, device)),
                            model_flops(module, batch)[0])
        entry["rows"].append({"kernel": kernel, "layers": layers, "seq_len": length, "step_s": measured[layers][0]})
    (t2, f2), (t4, f4) = measured[2], measured[4]
    t32, f32 = t2 + (t4 - t2) * 15, f2 + (f4 - f2) * 15  # 2 + 15 x 2 layers
    row = {"kernel": kernel, "layers": "32 (extrapolated)", "seq_len": length, "step_s": t32,
           "tokens_per_s": length / t32}
    peak = peak_tflops(device, args)
    if peak:
        row["mfu_per_doc"] = f32 / t32 / (peak * 1e12)
    entry["rows"].append(row)
    module.model.zero_grad(set_to_none=True)
    entry["notes"].append("forward + backward only (no optimizer step, no data loading): an upper bound of the "
                          "training step; ProLong reports 3,095 tokens/s per H100 at 64K, the goal is >= 4,600 "
                          "(45% MFU per document)")
