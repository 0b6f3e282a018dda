"""The loss from hidden states: log-probs and entropy of ``hidden @ weight.T``, forward and backward.

Contenders (bf16 hidden ``[N, H]`` and LM head ``[V, H]``, entropy and log-prob both carrying gradient):

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

Figures and their kinds:

* ``measured CPU``: time (median) and peak extra memory (profiler allocations minus frees, beyond
  the inputs) of one forward+backward at a small size (``CPU_SIZE``), for the torch contenders.
  The fused path is not timed on the CPU (the interpreter measures Python).
* ``counted``: FLOPs (matmuls, 2 per multiply-add) and bytes of memory traffic at
  ``V = 151936, H = 3584, N = 16k / 64k`` from each design's loop structure (the terms are in
  ``designs``), and extra memory: the fused path's allocations (``fused_extra_bytes``, the same
  tensors ``kernels/linear_logprobs.py`` allocates), the others' live ``[N, V]``-sized tensors.
  Bytes assume each matmul reads its operands from DRAM once per pass (L2 serves the reuse
  inside a pass, as any GEMM roofline assumes) and count in full what is written to memory and
  read back: logits tiles, ``[N, V]`` temporaries, the fp32 accumulators (read and written once
  per tile that adds into them).
* ``model``: H100 time = max(FLOPs / 989 TFLOP/s (dense bf16, data sheet), bytes / 3 TB/s).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import rlloss
from harness import Part, Run, cpu_peak_bytes

V_MODEL, H_MODEL = 151936, 3584
N_MODEL = (16384, 65536)
CPU_SIZE = (1024, 8192, 256)  # N, V, H measured on the CPU
QUICK_CPU_SIZE = (256, 2048, 64)
PEAK_FLOPS = 989e12  # H100 SXM dense bf16
PEAK_BYTES = 3.0e12  # H100 HBM3, rounded down from 3.35 TB/s
BF16 = 2
TRL_TILE = (4096, 32768)
CONTENDERS = ("eager", "chunked-512", "chunked-1024", "trl-1.16", "rlloss-torch", "rlloss-fused")


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
    backend = {"rlloss-torch": "torch", "rlloss-fused": "triton"}[name]
    return lambda h, w, ids: rlloss.linear_token_logprobs(h, w, ids, return_entropy=True, backend=backend)


def make_inputs(n: int, v: int, h: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(torch.bfloat16)
    weight = (torch.randn(v, h, generator=gen) / h**0.5).to(torch.bfloat16)
    ids = torch.randint(0, v, (n,), generator=gen)
    gl, ge = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    return hidden, weight, ids, gl, ge


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


def measure_cpu(names: tuple[str, ...], size: tuple[int, int, int], reps: int) -> dict[str, dict[str, Any]]:
    """Median fwd+bwd time and peak extra memory of each torch contender at ``size`` (measured CPU)."""
    inputs = make_inputs(*size)
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        try:
            fn = build(name)
            step(fn, *inputs)  # warm-up (and the import, for trl)
        except Exception as exc:  # trl missing or broken here: reported, not hidden
            out[name] = {"skipped": f"{type(exc).__name__}: {exc}"[:200]}
            continue
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            step(fn, *inputs)
            times.append(time.perf_counter() - t0)
        leaves = (inputs[0].clone().requires_grad_(True), inputs[1].clone().requires_grad_(True))
        peak = cpu_peak_bytes(lambda: step(fn, *inputs, leaves=leaves))
        n, v, h = size
        extra = peak - BF16 * (n * h + v * h) - 2 * 4 * n  # beyond the gradients and the two outputs
        fixed, elements = _fixed_and_elements(name, n, v, h)
        out[name] = {"ms": 1e3 * statistics.median(times), "peak_extra_bytes": extra,
                     "bytes_per_logit": (extra - fixed) / elements}
    return out


# --- the counted designs ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Counted:
    flops: float
    bytes: float
    extra_bytes: float

    def model_ms(self) -> float:
        return 1e3 * max(self.flops / PEAK_FLOPS, self.bytes / PEAK_BYTES)


def fused_extra_bytes(n: int, v: int, h: int) -> int:
    """What ``linear_stats`` + ``linear_grads`` allocate beyond inputs, outputs and gradients (bf16 inputs).

    Forward: ``m, s, u, zt`` and the saved ``lse`` (fp32 ``[N]``), ``order`` (int64 ``[N]``).
    Backward: the fp32 accumulators ``d hidden`` ``[N, H]`` and ``d weight`` ``[V, H]`` (rounded to
    bf16 at the end: those bf16 copies are the gradients), ``order`` again.
    """
    return 4 * n * 5 + 8 * n + 4 * n * h + 4 * v * h


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
    out = {"eager": Counted(3 * mm, nv * (eager_per_elem_fwd + eager_per_elem_bwd) + 3 * inputs + grads_out,
                            22.0 * nv)}
    for chunk in (512, 1024):
        # forward as eager per chunk; backward recomputes (logits again) and adds d weight in fp32 per chunk
        out[f"chunked-{chunk}"] = Counted(
            4 * mm, nv * (eager_per_elem_fwd + 2 + eager_per_elem_bwd) + 4 * inputs + grads_out
            + acc_rmw(v, h, -(-n // chunk)),
            22.0 * min(chunk, n) * v + 4.0 * v * h)
    tn, tv = TRL_TILE
    # tiles: forward write + epilogue read; backward write, in-place read + write, two matmul reads
    out["trl-1.16"] = Counted(4 * mm, BF16 * nv * (2 + 5) + 4 * inputs + grads_out
                              + acc_rmw(n, h, -(-v // tv)) + acc_rmw(v, h, -(-n // tn)),
                              BF16 * min(n, tn) * tv + 4.0 * n * h + 4.0 * v * h + 4 * 7 * n)
    out["rlloss-torch"] = Counted(3 * mm, out["eager"].bytes + 8.0 * nv, 26.0 * nv)  # fp32 logits from the start
    b = BLOCKS["16bit"]
    out["rlloss-fused"] = Counted(5 * mm, 3 * inputs + grads_out + acc_rmw(n, h, -(-v // b["dh"][1]))
                                  + acc_rmw(v, h, -(-n // b["dw"][0])) + 4 * 8 * n,
                                  fused_extra_bytes(n, v, h))
    for name, k in (bytes_per_logit or {}).items():
        fixed, elements = _fixed_and_elements(name, n, v, h)
        out[name] = dataclasses.replace(out[name], extra_bytes=fixed + k * elements)
    return out


def report(quick: bool = False, reps: int = 3) -> dict[str, Any]:
    """Print the "from hidden states" tables and return them for the benchmark's JSON record."""
    size = QUICK_CPU_SIZE if quick else CPU_SIZE
    torch_names = tuple(c for c in CONTENDERS if c != "rlloss-fused")
    measured = measure_cpu(torch_names, size, 1 if quick else reps)
    # trl's CPU fallback folds each tile in fp32 torch ops; on CUDA its epilogue keeps the bf16 tile only: counted
    per_logit = {k: m["bytes_per_logit"] for k, m in measured.items() if "bytes_per_logit" in m and k != "trl-1.16"}
    counted = {n: designs(n, V_MODEL, H_MODEL, per_logit) for n in N_MODEL}
    small = designs(*size)
    gib = 2.0**30
    print(f"\nfrom hidden states (bf16 hidden and LM head, log-prob and entropy gradients), "
          f"N={size[0]} V={size[1]} H={size[2]}: measured CPU, median of {1 if quick else reps}")
    print(f"{'contender':14} {'fwd+bwd ms':>11} {'peak extra MiB':>15} {'B per logit':>12}")
    for name in CONTENDERS:
        m = measured.get(name, {})
        ms = f"{m['ms']:.1f}" if "ms" in m else ("skipped" if "skipped" in m else "not timed")
        if "peak_extra_bytes" in m:
            peak, per = f"{m['peak_extra_bytes'] / 2**20:.2f}", f"{m['bytes_per_logit']:.1f}"
        else:  # the fused path: its allocations, counted
            peak, per = f"{small[name].extra_bytes / 2**20:.2f} (counted)", "0"
        print(f"{name:14} {ms:>11} {peak:>15} {per:>12}")
    for name, m in measured.items():
        if "skipped" in m:
            print(f"  {name} skipped: {m['skipped']}")
    print(f"\nfrom hidden states at V={V_MODEL}, H={H_MODEL}: extra memory (fused: counted; torch contenders: model, "
          f"their measured bytes per logit times the logits-sized elements they keep), FLOPs and bytes (counted), "
          f"H100 time (model: max of FLOPs at {PEAK_FLOPS / 1e12:.0f} TFLOP/s, bytes at {PEAK_BYTES / 1e12:.0f} TB/s)")
    print(f"{'contender':14} {'N':>6} {'extra GiB':>10} {'TFLOP':>7} {'GB moved':>9} {'model ms':>9} {'x FLOP bound':>13}")
    for n in N_MODEL:
        bound = 1e3 * 8 * n * V_MODEL * H_MODEL / PEAK_FLOPS  # fwd, recompute, d hidden, d weight: no [N, V] kept
        for name, c in counted[n].items():
            print(f"{name:14} {n:>6} {c.extra_bytes / gib:>10.2f} {c.flops / 1e12:>7.1f} {c.bytes / 1e9:>9.1f} "
                  f"{c.model_ms():>9.1f} {c.model_ms() / bound:>13.2f}")
    return {
        "cpu_size": dict(zip("NVH", size)),
        "measured_cpu": measured,
        "counted_at_cpu_size": {k: dataclasses.asdict(v) for k, v in small.items()},
        "counted_and_model": {str(n): {k: dataclasses.asdict(v) | {"model_ms": v.model_ms()} for k, v in c.items()}
                              for n, c in counted.items()},
        "model": {"peak_flops": PEAK_FLOPS, "peak_bytes_per_s": PEAK_BYTES, "V": V_MODEL, "H": H_MODEL},
    }


def run_part(run: Run) -> dict[str, Any]:
    """``bench_loss.py``'s part: the from-hidden-states section (measured CPU at a small size, modelled at large)."""
    return {"hidden": report(quick=run.quick)}


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
    record = report(quick=args.quick, reps=args.reps)
    out = Path(__file__).resolve().parent / "results" / f"bench-hidden-cpu{'-quick' if args.quick else ''}.json"
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
