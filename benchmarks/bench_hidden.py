"""The loss from hidden states: log-probs and entropy of ``hidden @ weight.T``, forward and backward.

Contenders (bf16 hidden ``[N, H]`` and LM head ``[V, H]``, entropy and log-prob both carrying gradient
except in ``rlloss-fused-logp``):

* ``eager``: ``hidden @ weight.T``, ``log_softmax`` in fp32, gather, entropy: the ``[N, V]`` logits
  and their fp32 companions live through backward.
* ``chunked-512``, ``chunked-1024``: the same per block of 512 / 1024 tokens in plain torch,
  recomputed in backward, ``d weight`` accumulated in fp32 (verl's and Liger's approach; written here).
* ``trl-1.16``: TRL 1.16's ``ChunkedLogProbFunction`` (``trl/kernels/chunked_logprob.py``): cuBLAS
  tiles of ``[4096, 32768]`` bf16 logits folded by an epilogue, recomputed in backward in place,
  fp32 ``d hidden`` / ``d weight`` accumulators. Measured on the CPU (its torch fallback) where
  trl imports; modelled from its tile sizes at the large sizes.
* ``rlloss-torch``: ``linear_token_logprobs(backend="torch")``, the reference (fp32 logits).
* ``rlloss-fused``: ``linear_token_logprobs(backend="triton")``: no ``[N, V]`` buffer at all.
* ``rlloss-fused-logp``: the same with ``entropy_grad=False``, only the log-prob carrying a gradient
  (GRPO, DAPO, Dr. GRPO without an entropy bonus; the entropy a metric): the forward forms
  ``d logp / d hidden`` and backward recomputes the logits once, for ``d weight``: 4 matmuls, not 5.

Figures and their kinds:

* ``measured``: time (median) and peak extra memory (beyond the inputs) of one forward+backward.
  On the CPU (profiler allocations minus frees) at a small size (``CPU_SIZE``), for the torch
  contenders: the fused path is not timed there (the interpreter measures Python). On CUDA (CUDA
  events, ``max_memory_allocated``) every contender, the fused ones included, at ``GPU_SIZE``
  (V = 151936, H = 3584): the figures that settle what the model below cannot.
* ``counted``: FLOPs (matmuls, 2 per multiply-add) and bytes of memory traffic at
  ``V = 151936, H = 3584, N = 16k / 64k`` from each design's loop structure (the terms are in
  ``designs``), and extra memory: the fused path's allocations (``fused_extra_bytes``, the same
  tensors ``kernels/linear_logprobs.py`` allocates), the others' live ``[N, V]``-sized tensors.
  Bytes assume each matmul reads its operands from DRAM once per pass (L2 serves the reuse
  inside a pass, as any GEMM roofline assumes) and count in full what is written to memory and
  read back: logits tiles, ``[N, V]`` temporaries, the fp32 accumulators (read and written once
  per tile that adds into them).
* ``counted``, L2: the matmul operands' traffic from L2 into the SMs (the fp32 accumulators' reads and
  writes, counted in the DRAM bytes, cross L2 too and are not in this column), from each design's tile sizes
  (``2 H (BN + BV)`` bytes per ``BN x BV`` logits tile and pass, plus the second operand of a fused
  backward or ``P @ W`` product; cuBLAS's tiles taken as 128 x 256). Not in the time model (the data
  sheet gives no L2 bandwidth), but it is what thin tiles cost: see docs/hidden-states.md.
* ``model``: H100 time = max(FLOPs / 989 TFLOP/s (dense bf16, data sheet), bytes / 3 TB/s).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

import rlloss
from harness import CudaClock, Meter, Part, Run, skip_reason, timed

V_MODEL, H_MODEL = 151936, 3584
N_MODEL = (16384, 65536)
CPU_SIZE = (1024, 8192, 256)  # N, V, H measured on the CPU
QUICK_CPU_SIZE = (256, 2048, 64)
GPU_SIZE = (16384, 151936, 3584)  # measured on CUDA: eager's logits and their fp32 companions take ~51 GiB
PEAK_FLOPS = 989e12  # H100 SXM dense bf16
PEAK_BYTES = 3.0e12  # H100 HBM3, rounded down from 3.35 TB/s
BF16 = 2
TRL_TILE = (4096, 32768)
CONTENDERS = ("eager", "chunked-512", "chunked-1024", "trl-1.16", "rlloss-torch", "rlloss-fused", "rlloss-fused-logp")
FUSED = ("rlloss-fused", "rlloss-fused-logp")
LOGP_ONLY = ("rlloss-fused-logp",)  # the entropy is computed, not differentiated


# --- the torch contenders ------------------------------------------------------------------------------

def _stats(z: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lsm = torch.log_softmax(z, -1)
    return lsm.gather(-1, ids[:, None])[:, 0], -(lsm.exp() * lsm).sum(-1)


def eager(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _stats((hidden @ weight.T).float(), ids)


class _Chunked(torch.autograd.Function):
    """Per block of tokens: logits, statistics; backward recomputes them. Nothing [N, V] is kept."""

    @staticmethod
    def forward(ctx, hidden, weight, ids, chunk):
        logp, ent = torch.empty(len(ids)), torch.empty(len(ids))
        for i in range(0, len(ids), chunk):
            with torch.no_grad():
                logp[i:i + chunk], ent[i:i + chunk] = _stats((hidden[i:i + chunk] @ weight.T).float(), ids[i:i + chunk])
        ctx.save_for_backward(hidden, weight, ids)
        ctx.chunk = chunk
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, ids = ctx.saved_tensors
        d_hidden = torch.empty_like(hidden)
        d_weight = torch.zeros(weight.shape, dtype=torch.float32)
        for i in range(0, len(ids), ctx.chunk):
            h = hidden[i:i + ctx.chunk]
            with torch.enable_grad():
                z = (h @ weight.T).float().requires_grad_(True)
                logp, ent = _stats(z, ids[i:i + ctx.chunk])
                (dz,) = torch.autograd.grad((logp * g_logp[i:i + ctx.chunk]).sum() + (ent * g_ent[i:i + ctx.chunk]).sum(), z)
            dz = dz.to(hidden.dtype)
            d_hidden[i:i + ctx.chunk] = dz @ weight
            d_weight += (dz.T @ h).float()
        return d_hidden, d_weight.to(weight.dtype), None, None


def trl_head(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from trl.kernels import ChunkedLogProbFunction

    out = ChunkedLogProbFunction.apply(hidden, weight, None, ids, 1.0, TRL_TILE[1], None, 1.0, ("entropy",))
    return out[0], out[1]


def build(name: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    if name == "eager":
        return eager
    if name.startswith("chunked-"):
        chunk = int(name.split("-")[1])
        return lambda h, w, ids: _Chunked.apply(h, w, ids, chunk)
    if name == "trl-1.16":
        return trl_head
    if name in LOGP_ONLY:
        return lambda h, w, ids: rlloss.linear_token_logprobs(h, w, ids, return_entropy=True, entropy_grad=False,
                                                              backend="triton")
    backend = {"rlloss-torch": "torch", "rlloss-fused": "triton"}[name]
    return lambda h, w, ids: rlloss.linear_token_logprobs(h, w, ids, return_entropy=True, backend=backend)


def make_inputs(n: int, v: int, h: int, seed: int = 0, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(torch.bfloat16)
    weight = (torch.randn(v, h, generator=gen) / h**0.5).to(torch.bfloat16)
    ids = torch.randint(0, v, (n,), generator=gen)
    gl, ge = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    return tuple(x.to(device) for x in (hidden, weight, ids, gl, ge))


def step(fn, hidden, weight, ids, gl, ge, leaves=None) -> tuple[torch.Tensor, ...]:
    h, w = leaves or (hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True))
    logp, ent = fn(h, w, ids)
    gh, gw = torch.autograd.grad((logp * gl).sum() + (ent * ge).sum(), [h, w])
    return logp.detach(), ent.detach(), gh, gw


def _fixed_and_elements(name: str, n: int, v: int, h: int) -> tuple[float, float]:
    """A torch contender's extra memory as ``fixed + k * elements``: the terms that do not scale with
    logits, and how many logits-sized elements are live at once (all N x V, one chunk, one tile)."""
    if name.startswith("chunked-"):
        return 4.0 * v * h, min(int(name.split("-")[1]), n) * v
    if name == "trl-1.16":
        return 4.0 * (n * h + v * h) + 4 * 7 * n, min(n, TRL_TILE[0]) * min(v, TRL_TILE[1])
    return 0.0, n * v


def measure(names: tuple[str, ...], size: tuple[int, int, int], reps: int, meter: Meter | None = None
            ) -> dict[str, dict[str, Any]]:
    """Median fwd+bwd time and peak extra memory of each contender at ``size`` (measured; CPU without
    ``meter``, else the meter's device: its clock and its memory meter)."""
    meter = meter or Meter.for_device(torch.device("cpu"), reps, 1)
    device = torch.device("cuda") if isinstance(meter.clock, CudaClock) else torch.device("cpu")
    inputs = make_inputs(*size, device=device)
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        try:
            fn = build(name)
            step(fn, *inputs)  # warm-up (and the import, for trl; the kernels' compilation on CUDA)
        except Exception as exc:  # trl missing or broken here, or out of memory: reported, not hidden
            out[name] = {"skipped": skip_reason(exc)}
            if device.type == "cuda":
                torch.cuda.empty_cache()  # what a failed contender cached is not the next one's to pay
            continue
        t = timed(meter.clock, lambda: step(fn, *inputs), reps)
        leaves = (inputs[0].clone().requires_grad_(True), inputs[1].clone().requires_grad_(True))
        peak = meter.peak(lambda: step(fn, *inputs, leaves=leaves))
        n, v, h = size
        extra = peak - BF16 * (n * h + v * h) - 2 * 4 * n  # beyond the gradients and the two outputs
        fixed, elements = _fixed_and_elements(name, n, v, h)
        out[name] = {"ms": t.median, "spread": t.as_dict(), "peak_extra_bytes": extra,
                     "bytes_per_logit": (extra - fixed) / elements}
    return out


# --- the counted designs ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Counted:
    flops: float
    bytes: float
    extra_bytes: float
    l2_bytes: float = 0.0

    def model_ms(self) -> float:
        return 1e3 * max(self.flops / PEAK_FLOPS, self.bytes / PEAK_BYTES)


def fused_extra_bytes(n: int, v: int, h: int) -> int:
    """What ``linear_stats`` + ``linear_grads`` allocate beyond inputs, outputs and gradients (bf16 inputs).

    Forward: ``m, s, u, zt`` and the saved ``lse`` (fp32 ``[N]``), ``order`` (int64 ``[N]``).
    Backward: the fp32 accumulators ``d hidden`` ``[N, H]`` and ``d weight`` ``[V, H]`` (rounded to
    bf16 at the end: those bf16 copies are the gradients), ``order`` again. With the log-prob's
    gradient alone, the forward's fp32 ``d logp / d hidden`` ``[N, H]`` takes ``d hidden``'s place
    (backward scales it straight into the bf16 gradient): the same total.
    """
    return 4 * n * 5 + 8 * n + 4 * n * h + 4 * v * h


def operand_l2_bytes(n: int, v: int, h: int, bn: int, bv: int) -> float:
    """Bytes of bf16 operands brought into the SMs by one pass of ``BN x BV`` logits tiles over ``H``."""
    return BF16 * h * (bn + bv) * -(-n // bn) * -(-v // bv)


def designs(n: int, v: int, h: int, bytes_per_logit: dict[str, float] | None = None) -> dict[str, Counted]:
    """FLOPs, bytes and extra memory of each design at ``n`` tokens (see the module docstring).

    ``bytes_per_logit``: the torch contenders' live bytes per logits-sized element, measured on the
    CPU (``measure_cpu``); their extra memory is then ``fixed + bytes_per_logit * elements`` (model).
    """
    from rlloss.kernels.linear_logprobs import BLOCKS

    nv, mm = n * v, 2.0 * n * v * h  # one [N, V] matmul
    inputs = BF16 * (n * h + v * h)  # hidden and weight, read once per pass
    grads_out = BF16 * (n * h + v * h)
    acc_rmw = lambda rows, cols, passes: 8.0 * rows * cols * passes  # fp32 read + write per adding tile
    # eager, per [N, V] element: logits (write 2, read 2), fp32 copy (w 4, r 4), log_softmax (w 4, r 4),
    # exp (w 4, r 4), p * lsm (w 4, r 8 + sum 4); backward about as much again in fp32, plus the bf16
    # d logits (w 2, read by two matmuls 4); saved: lsm, p (8) plus a backward fp32 temporary or two (12), d logits 2
    eager_per_elem_fwd = 2 + 2 + 4 + 4 + 4 + 4 + 4 + 4 + 4 + 12
    eager_per_elem_bwd = 40 + 2 + 4
    cublas = operand_l2_bytes(n, v, h, 128, 256)  # one cuBLAS matmul over [N, V] (tiles taken as 128 x 256)
    out = {"eager": Counted(3 * mm, nv * (eager_per_elem_fwd + eager_per_elem_bwd) + 3 * inputs + grads_out,
                            22.0 * nv, 3 * cublas)}
    for chunk in (512, 1024):
        # forward as eager per chunk; backward recomputes (logits again) and adds d weight in fp32 per chunk
        out[f"chunked-{chunk}"] = Counted(
            4 * mm, nv * (eager_per_elem_fwd + 2 + eager_per_elem_bwd) + 4 * inputs + grads_out
            + acc_rmw(v, h, -(-n // chunk)),
            22.0 * min(chunk, n) * v + 4.0 * v * h, 4 * cublas)
    tn, tv = TRL_TILE
    # tiles: forward write + epilogue read; backward write, in-place read + write, two matmul reads
    out["trl-1.16"] = Counted(4 * mm, BF16 * nv * (2 + 5) + 4 * inputs + grads_out
                              + acc_rmw(n, h, -(-v // tv)) + acc_rmw(v, h, -(-n // tn)),
                              BF16 * min(n, tn) * tv + 4.0 * n * h + 4.0 * v * h + 4 * 7 * n, 4 * cublas)
    out["rlloss-torch"] = Counted(3 * mm, out["eager"].bytes + 8.0 * nv, 26.0 * nv, 3 * cublas)  # fp32 logits
    b = BLOCKS["16bit"]
    fwd, dh, dw, dw_ent = (b[k][:2] for k in ("fwd", "dh", "dw", "dw_ent"))
    # per pass: the logits tile's operands; then d hidden's (P @ W, d logits @ W) re-read weight rows
    # per token block, d weight's (d logits^T @ hidden) re-reads hidden rows per vocabulary block
    l2_dh = operand_l2_bytes(n, v, h, *dh) + BF16 * v * h * -(-n // dh[0])
    l2_dw = operand_l2_bytes(n, v, h, *dw) + BF16 * n * h * -(-v // dw[1])
    l2_dw_ent = operand_l2_bytes(n, v, h, *dw_ent) + BF16 * n * h * -(-v // dw_ent[1])
    out["rlloss-fused"] = Counted(5 * mm, 3 * inputs + grads_out + acc_rmw(n, h, -(-v // dh[1]))
                                  + acc_rmw(v, h, -(-n // dw_ent[0])) + 4 * 8 * n,
                                  fused_extra_bytes(n, v, h), operand_l2_bytes(n, v, h, *fwd) + l2_dh + l2_dw_ent)
    # the forward adds P @ W into its fp32 [N, H] rows per vocabulary block, the finish reads them, the
    # target's weight row and writes them once; backward reads them once
    out["rlloss-fused-logp"] = Counted(
        4 * mm, 2 * inputs + grads_out + acc_rmw(n, h, -(-v // fwd[1])) + (8.0 + BF16) * n * h + 4.0 * n * h
        + acc_rmw(v, h, -(-n // dw[0])) + 4 * 8 * n, fused_extra_bytes(n, v, h),
        operand_l2_bytes(n, v, h, *fwd) + BF16 * v * h * -(-n // fwd[0]) + l2_dw)
    for name, k in (bytes_per_logit or {}).items():
        fixed, elements = _fixed_and_elements(name, n, v, h)
        out[name] = dataclasses.replace(out[name], extra_bytes=fixed + k * elements)
    return out


def report(quick: bool = False, reps: int = 3, meter: Meter | None = None) -> dict[str, Any]:
    """Print the "from hidden states" tables and return them for the benchmark's JSON record.

    ``meter``: a CUDA meter times every contender at ``GPU_SIZE``; else the torch contenders on the CPU.
    """
    on_gpu = meter is not None and isinstance(meter.clock, CudaClock)
    size = QUICK_CPU_SIZE if quick else GPU_SIZE if on_gpu else CPU_SIZE
    names = CONTENDERS if on_gpu else tuple(c for c in CONTENDERS if c not in FUSED)
    reps = 1 if quick else reps
    measured = measure(names, size, reps, meter if on_gpu else None)
    # trl's CPU fallback folds each tile in fp32 torch ops; on CUDA its epilogue keeps the bf16 tile only: counted
    per_logit = {k: m["bytes_per_logit"] for k, m in measured.items()
                 if "bytes_per_logit" in m and k != "trl-1.16" and k not in FUSED}
    counted = {n: designs(n, V_MODEL, H_MODEL, per_logit) for n in N_MODEL}
    small = designs(*size)
    gib = 2.0**30
    kind = "measured CUDA (CUDA events)" if on_gpu else "measured CPU"
    print(f"\nfrom hidden states (bf16 hidden and LM head, log-prob and entropy gradients; -logp: log-prob only), "
          f"N={size[0]} V={size[1]} H={size[2]}: {kind}, median of {reps}")
    print(f"{'contender':17} {'fwd+bwd ms':>11} {'peak extra MiB':>15} {'B per logit':>12}")
    for name in CONTENDERS:
        m = measured.get(name, {})
        ms = f"{m['ms']:.1f}" if "ms" in m else ("skipped" if "skipped" in m else "not timed")
        if "peak_extra_bytes" in m:
            per = "-" if name in FUSED else f"{m['bytes_per_logit']:.1f}"
            peak = f"{m['peak_extra_bytes'] / 2**20:.2f}"
        else:  # the fused path on the CPU: its allocations, counted
            peak, per = f"{small[name].extra_bytes / 2**20:.2f} (counted)", "0"
        print(f"{name:17} {ms:>11} {peak:>15} {per:>12}")
    for name, m in measured.items():
        if "skipped" in m:
            print(f"  {name} skipped: {m['skipped']}")
    print(f"\nfrom hidden states at V={V_MODEL}, H={H_MODEL}: extra memory (fused: counted; torch contenders: model, "
          f"their measured bytes per logit times the logits-sized elements they keep), FLOPs and bytes (counted), "
          f"H100 time (model: max of FLOPs at {PEAK_FLOPS / 1e12:.0f} TFLOP/s, bytes at {PEAK_BYTES / 1e12:.0f} TB/s)")
    print(f"{'contender':17} {'N':>6} {'extra GiB':>10} {'TFLOP':>7} {'GB moved':>9} {'model ms':>9} "
          f"{'x FLOP bound':>13} {'L2->SM TB':>10}")
    for n in N_MODEL:
        bound = 1e3 * 8 * n * V_MODEL * H_MODEL / PEAK_FLOPS  # fwd, recompute, d hidden, d weight: no [N, V] kept
        for name, c in counted[n].items():
            print(f"{name:17} {n:>6} {c.extra_bytes / gib:>10.2f} {c.flops / 1e12:>7.1f} {c.bytes / 1e9:>9.1f} "
                  f"{c.model_ms():>9.1f} {c.model_ms() / bound:>13.2f} {c.l2_bytes / 1e12:>10.1f}")
    return {
        "measured_size": dict(zip("NVH", size)),
        "measured_kind": kind,
        "measured": measured,
        "counted_at_measured_size": {k: dataclasses.asdict(v) for k, v in small.items()},
        "counted_and_model": {str(n): {k: dataclasses.asdict(v) | {"model_ms": v.model_ms()} for k, v in c.items()}
                              for n, c in counted.items()},
        "model": {"peak_flops": PEAK_FLOPS, "peak_bytes_per_s": PEAK_BYTES, "V": V_MODEL, "H": H_MODEL},
    }


def run_part(run: Run) -> dict[str, Any]:
    """``bench_loss.py``'s part: the from-hidden-states section (measured on the run's device, modelled at large)."""
    return {"hidden": report(quick=run.quick, reps=min(run.meter.reps, 5), meter=run.meter)}


PART = Part("the from-hidden-states problem", run_part, flag="hidden", help="leave out the from-hidden-states problem")


def main() -> int:
    """``python benchmarks/bench_hidden.py [--quick]``: this part alone, JSON in benchmarks/results/."""
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    record = report(quick=args.quick, reps=args.reps, meter=Meter.for_device(device, args.reps, 1))
    out = (Path(__file__).resolve().parent / "results"
           / f"bench-hidden-{device.type}{'-quick' if args.quick else ''}.json")
    out.write_text(json.dumps(record, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    import os
    import sys

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    raise SystemExit(main())
