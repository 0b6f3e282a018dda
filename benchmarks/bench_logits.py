"""The from-logits problem: the policy loss computed from ``[B, T, V]`` logits, forward and backward.

Contenders: ``eager`` (``policy_loss_from_logits(backend="torch")``: log_softmax, gather, the
loss), ``compile`` (the same reference under ``torch.compile``), ``rlloss-triton`` (the fused
vocabulary-streaming kernels; CUDA only) and ``liger-triton`` (Liger-Kernel's
``triton_grpo_loss``; CUDA only, when ``liger_kernel`` imports). On the CPU only the smallest
size runs (4096 tokens, V=32768: 256 MiB of bf16 logits). The counted section counts launches and
bytes at a small size, where the interpreter is quick, and the modelled H100 time scales those
bytes to the GPU sizes in proportion to tokens x vocabulary (the logits dominate every term).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

import rlloss

T_ROW = 1024  # tokens per sequence; B = tokens / T_ROW
CPU_SIZES = ((4096, 32768),)
GPU_SIZES = tuple((n, v) for v in (32768, 151936) for n in (4096, 16384, 65536))
QUICK_SIZES = ((256, 4096),)
COUNT_SIZE = (2, 128, 4096)  # B, T, V for the counted section
LOSS_OPTIONS = {"eps_low": 0.2, "eps_high": 0.28, "aggregation": "token_mean"}  # DAPO


def make_inputs(tokens: int, vocab: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    b = max(tokens // T_ROW, 1)
    t = tokens // b
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, t, vocab, generator=gen, dtype=torch.bfloat16) * 2).to(device)
    ids = torch.randint(0, vocab, (b, t), generator=gen).to(device)
    with torch.no_grad():
        old = rlloss.token_logprobs(logits, ids, backend="torch") + 0.05 * torch.randn(b, t, generator=gen).to(device)
    lengths = torch.randint(t // 4, t + 1, (b,), generator=gen).to(device)
    return {"logits": logits, "ids": ids, "old_logp": old, "adv": torch.randn(b, generator=gen).to(device),
            "mask": torch.arange(t, device=device)[None, :] < lengths[:, None]}


LossFn = Callable[[torch.Tensor], torch.Tensor]


def build(name: str, inputs: dict[str, torch.Tensor]) -> LossFn:
    args = (inputs["ids"], inputs["old_logp"], inputs["adv"], inputs["mask"])
    if name in ("eager", "rlloss-triton"):
        backend = "torch" if name == "eager" else "triton"
        return lambda logits: rlloss.policy_loss_from_logits(logits, *args, backend=backend, **LOSS_OPTIONS).loss
    if name == "compile":
        from rlloss.logits import _token_logprobs_torch
        from rlloss.loss import _policy_loss_torch

        from bench_loss import reference_args

        loss_args = reference_args(LOSS_OPTIONS)

        def reference(logits, ids, old, adv, mask):
            logp, _ = _token_logprobs_torch(logits, ids, 1.0, False)
            return _policy_loss_torch(logp, old, adv, mask, *loss_args).loss

        compiled = torch.compile(reference, fullgraph=True)
        return lambda logits: compiled(logits, *args)
    if name == "liger-triton":
        return liger_loss(inputs)
    raise ValueError(f"unknown contender {name!r}")


def liger_loss(inputs: dict[str, torch.Tensor]) -> LossFn:
    """Liger-Kernel's Triton GRPO loss with the same objective (DAPO's clip, token mean, no KL).

    Liger takes ``[B, T+1, V]`` logits (a causal LM's output before the shift), so one position is
    appended. Never run here: this machine has no GPU and no liger_kernel; written against its
    published signature ``triton_grpo_loss(logits, old_logp, ref_logp, completion_ids, advantages,
    completion_mask, temperature, beta, eps_low, eps_high, inplace, loss_type, ...)``.
    """
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    def loss(logits: torch.Tensor) -> torch.Tensor:
        padded = torch.cat([logits, logits[:, -1:]], dim=1)
        out = triton_grpo_loss(padded, inputs["old_logp"], None, inputs["ids"], inputs["adv"], inputs["mask"],
                               temperature=1.0, beta=0.0, eps_low=0.2, eps_high=0.28, inplace=True,
                               loss_type="dapo")
        out = out[0] if isinstance(out, tuple) else out
        if out.dim():  # per-token losses: DAPO's token mean
            out = (out * inputs["mask"]).sum() / inputs["mask"].sum().clamp(min=1)
        return out

    return loss


def contenders(on_gpu: bool, with_compile: bool) -> list[str]:
    names = ["eager"] + (["compile"] if with_compile else [])
    if on_gpu:
        names.append("rlloss-triton")
        try:
            import liger_kernel  # noqa: F401

            names.append("liger-triton")
        except ImportError:
            print("from logits: liger-triton skipped: liger_kernel is not installed")
    else:
        print("from logits: rlloss-triton and liger-triton skipped: no CUDA device")
    return names


@dataclasses.dataclass
class LogitsRow:
    tokens: int
    vocab: int
    contender: str
    ms: dict[str, float]
    peak_extra_bytes: int


def sweep(names: list[str], sizes: tuple[tuple[int, int], ...], device: torch.device, measure: Callable[..., Any],
          clock: Any, peak: Callable[..., int], reps: int, warmup: int) -> list[LogitsRow]:
    rows = []
    for tokens, vocab in sizes:
        inputs = make_inputs(tokens, vocab, device)
        for name in names:
            ms, peak_bytes = measure(build(name, inputs), inputs["logits"], clock, peak, reps, warmup)
            rows.append(LogitsRow(tokens, vocab, name, ms, peak_bytes))
        del inputs
    return rows


def table(rows: list[LogitsRow]) -> str:
    base = {(r.tokens, r.vocab): r.ms["fwd+bwd"] for r in rows if r.contender == "eager"}
    head = f"{'tokens':>8}{'V':>8}{'contender':>15}{'fwd ms':>10}{'bwd ms':>10}{'f+b ms':>10}{'x eager':>9}{'peak MiB':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.tokens:>8}{r.vocab:>8}{r.contender:>15}{r.ms['fwd']:>10.1f}{r.ms['bwd']:>10.1f}"
                     f"{r.ms['fwd+bwd']:>10.1f}{base[(r.tokens, r.vocab)] / r.ms['fwd+bwd']:>9.2f}"
                     f"{r.peak_extra_bytes / 2**20:>10.1f}")
    return "\n".join(lines)


def counted_and_modelled(target: tuple[int, int] = (65536, 151936)) -> dict[str, Any]:
    """Count launches and bytes of forward+backward at COUNT_SIZE; model the H100 at ``target``."""
    from roofline import HBM_BYTES_PER_S, LAUNCH_US
    from traffic import count_torch_ops, count_triton, interpreter_active

    b, t, v = COUNT_SIZE
    inputs = make_inputs(b * t, v, torch.device("cpu"))
    logits = inputs["logits"]
    # the least any backend can move: the logits read once, d/dlogits written once, the small inputs once
    small = sum(x.numel() * x.element_size() for k, x in inputs.items() if k != "logits")
    minimum = 2 * logits.numel() * logits.element_size() + small
    out: dict[str, Any] = {"size": [b, t, v], "minimum_bytes": minimum, "rows": []}
    for name in ("eager", "rlloss-triton"):
        if name == "rlloss-triton" and not interpreter_active():
            continue
        fn = build(name, inputs)
        leaf = logits.detach().clone().requires_grad_(True)

        seed = torch.ones((), dtype=torch.float32)  # the incoming gradient belongs to the caller

        def step() -> None:
            leaf.grad = None  # a fresh gradient is stored, not added to an old one
            torch.autograd.backward(fn(leaf), seed)

        step()
        counter = count_triton if name == "rlloss-triton" else count_torch_ops
        counts = counter(step)
        launches, moved = counts.n_launches, counts.bytes
        out["rows"].append({"contender": name, "launches": launches, "bytes": moved, "x_min": moved / minimum})
    n_target, v_target = target
    scale = (n_target * v_target) / (b * t * v)
    print(f"\nfrom logits, counted at B x T x V = {b}x{t}x{v} (bf16 logits, DAPO loss): launches and bytes of "
          "forward+backward; minimum = logits read once + d/dlogits written once + the [B, T] inputs")
    print(f"MODELLED H100 at {n_target} tokens x V={v_target}: bytes scaled by tokens x V, / "
          f"{HBM_BYTES_PER_S / 1e12:g} TB/s, + launches x {LAUNCH_US:g} us (a model, not a measurement)")
    print(f"{'contender':>15}{'launches':>10}{'bytes':>14}{'x min':>8}{'model ms':>10}")
    for row in out["rows"]:
        row["modelled_ms"] = (row["bytes"] * scale / HBM_BYTES_PER_S + row["launches"] * LAUNCH_US * 1e-6) * 1e3
        print(f"{row['contender']:>15}{row['launches']:>10}{row['bytes']:>14,}{row['x_min']:>8.2f}{row['modelled_ms']:>10.2f}")
    out["target"] = list(target)
    return out
