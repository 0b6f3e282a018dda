"""The loss from hidden states: log-probs and entropy of ``hidden @ weight.T``, forward and backward.

Contenders (bf16 hidden ``[N, H]`` and LM head ``[V, H]``; the log-prob contenders differentiate
``sum(gl * logp + ge * entropy)``):

* ``eager``: ``hidden @ weight.T``, ``log_softmax`` in fp32, gather, entropy: the ``[N, V]`` logits
  and their fp32 companions live through backward.
* ``chunked-512``, ``chunked-1024``: the same per block of 512 / 1024 tokens in plain torch,
  recomputed in backward, ``d weight`` accumulated in fp32 (verl's and Liger's approach; written here).
* ``trl-1.16``: TRL 1.16's ``ChunkedLogProbFunction`` (``trl/kernels/chunked_logprob.py``): cuBLAS
  tiles of ``[4096, 32768]`` bf16 logits folded by an epilogue, recomputed in backward in place,
  fp32 ``d hidden`` / ``d weight`` accumulators. Measured where trl imports (its torch fallback on
  the CPU); counted from its code at the large sizes.
* ``rlloss-torch``: ``linear_token_logprobs(backend="torch")``, the reference (fp32 logits).
* ``rlloss-fused``: ``linear_token_logprobs(backend="triton")``, the general path: fp32 logits tiles of
  the default height (``kernels.linear_logprobs.default_tile_bytes``), statistics in the forward,
  each tile recomputed in backward: 4 matmuls over the head.
* ``rlloss-fused-loss``: ``policy_loss_from_hidden(backend="triton")`` with a token-local objective
  (REINFORCE summed over tokens with advantages ``-gl``: the log-prob contenders' gradient for
  ``ge = 0``), the loss path: the gradient formed in the forward, 3 matmuls.

Figures and their kinds:

* ``measured``: time (median) and peak extra memory (beyond the inputs) of one forward+backward.
  On the CPU (profiler allocations minus frees) at a small size (``CPU_SIZE``), for the torch
  contenders: the fused paths are not timed there (the interpreter measures Python). On CUDA
  (``python benchmarks/bench_hidden.py``, ``cuda_record``): every contender at N = 16k and 64k, V =
  151936, H = 3584, with CUDA events, ``max_memory_allocated``, and the fused paths' host syncs
  under ``torch.cuda.set_sync_debug_mode("error")``: the figures that settle what the model cannot.
* ``counted``: each design's launches (``designs``), their FLOPs (2 per multiply-add) and bytes of
  memory traffic at ``V = 151936, H = 3584, N = 16k / 64k``, and its extra memory (the peak of what
  is live beyond inputs, outputs and gradients: the fused paths' and TRL's allocations; the torch
  contenders' measured bytes per logit times the logits-sized elements they keep). A library
  matmul reads its operands from DRAM once (L2 serves the reuse inside it, as any GEMM roofline
  assumes) and writes its output once; an epilogue reads and writes what it touches; an fp32
  accumulator is read and written by each product that adds into it.
* ``counted``, L2: the matmul operands' traffic from L2 into the SMs, library GEMMs taken as 128 x
  256 tiles. Not in the time model (the data sheet gives no L2 bandwidth).
* ``model``: H100 time at 989 TFLOP/s (dense bf16, data sheet) and 3 TB/s, two ways: ``model_ms``,
  the whole call's FLOPs or bytes, whichever is slower (a memory-bound kernel hides under the
  matmuls); ``model_ms_per_kernel``, each launch at the slower of its FLOPs and bytes, summed (they
  run one after the other). Against two floors: 3 ``[N, V]`` matmuls (``bound_3mm_ms``: a loss the
  library owns, the gradient formed in the forward) and 4 (``bound_4mm_ms``: any upstream gradient)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

import rlloss
from harness import CudaClock, Meter, Part, Run, environment, skip_reason, timed

V_MODEL, H_MODEL = 151936, 3584
N_MODEL = (16384, 65536)
CPU_SIZE = (1024, 8192, 256)  # N, V, H measured on the CPU
QUICK_CPU_SIZE = (256, 2048, 64)
GPU_SIZE = (16384, 151936, 3584)  # measured on CUDA: eager's logits and their fp32 companions take ~51 GiB
PEAK_FLOPS = 989e12  # H100 SXM dense bf16
PEAK_BYTES = 3.0e12  # H100 HBM3, rounded down from 3.35 TB/s
BF16 = 2
TRL_TILE = (4096, 32768)
CONTENDERS = ("eager", "chunked-512", "chunked-1024", "trl-1.16", "rlloss-torch", "rlloss-fused", "rlloss-fused-loss")
FUSED = ("rlloss-fused", "rlloss-fused-loss")
LOSS = ("rlloss-fused-loss",)  # a loss (its own per-token gradient), not log-probs for an upstream gradient


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


def build(name: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
    """``fn(hidden, weight, ids, gl, ge) -> (loss, logp, entropy)``: the scalar to differentiate, and the
    log-prob contenders' outputs (None for the loss path, whose log-probs stay inside). The log-prob
    contenders' loss is ``sum(gl * logp + ge * entropy)``; the loss path's is REINFORCE summed over tokens
    with advantages ``-gl``, the same gradient with ``ge = 0``."""
    if name in LOSS:
        def loss_path(h, w, ids, gl, ge):
            mask = torch.ones(1, len(ids), dtype=torch.bool, device=ids.device)
            out = rlloss.policy_loss_from_hidden(h[None], w, ids[None], None, -gl[None], mask, objective="reinforce",
                                                 aggregation="token_sum", backend="triton")
            return out.loss, None, None
        return loss_path
    if name == "eager":
        head = eager
    elif name.startswith("chunked-"):
        chunk = int(name.split("-")[1])
        head = lambda h, w, ids: _Chunked.apply(h, w, ids, chunk)  # noqa: E731
    elif name == "trl-1.16":
        head = trl_head
    else:
        backend = {"rlloss-torch": "torch", "rlloss-fused": "triton"}[name]
        head = lambda h, w, ids: rlloss.linear_token_logprobs(h, w, ids, return_entropy=True,  # noqa: E731
                                                              backend=backend)

    def logprobs(h, w, ids, gl, ge):
        logp, ent = head(h, w, ids)
        return (logp * gl).sum() + (ent * ge).sum(), logp, ent
    return logprobs


def make_inputs(n: int, v: int, h: int, seed: int = 0, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(torch.bfloat16)
    weight = (torch.randn(v, h, generator=gen) / h**0.5).to(torch.bfloat16)
    ids = torch.randint(0, v, (n,), generator=gen)
    gl, ge = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    return tuple(x.to(device) for x in (hidden, weight, ids, gl, ge))


def step(fn, hidden, weight, ids, gl, ge, leaves=None) -> tuple[torch.Tensor | None, ...]:
    """One forward and backward of a contender from ``build``: ``(logp, entropy, d hidden, d weight)``."""
    h, w = leaves or (hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True))
    loss, logp, ent = fn(h, w, ids, gl, ge)
    gh, gw = torch.autograd.grad(loss, [h, w])
    return None if logp is None else logp.detach(), None if ent is None else ent.detach(), gh, gw


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
class Kernel:
    """One launch's counted work: ``count`` launches of ``flops`` and ``bytes`` each (one per chunk)."""

    name: str
    flops: float
    bytes: float
    count: int = 1

    def ms(self) -> float:
        """Model: each launch at the slower of its FLOPs and its bytes."""
        return 1e3 * self.count * max(self.flops / PEAK_FLOPS, self.bytes / PEAK_BYTES)


@dataclasses.dataclass(frozen=True)
class Counted:
    """A design's launches, extra memory (beyond inputs, outputs and gradients: the peak of what is live
    in any phase, less the gradients and outputs) and the counted L2-to-SM operand traffic."""

    kernels: tuple[Kernel, ...]
    extra_bytes: float
    l2_bytes: float = 0.0

    @property
    def flops(self) -> float:
        return sum(k.flops * k.count for k in self.kernels)

    @property
    def bytes(self) -> float:
        return sum(k.bytes * k.count for k in self.kernels)

    def model_ms(self) -> float:
        """Whole call: its FLOPs at peak, or its bytes at full bandwidth, whichever is slower."""
        return 1e3 * max(self.flops / PEAK_FLOPS, self.bytes / PEAK_BYTES)

    def model_ms_per_kernel(self) -> float:
        """Launches one after the other, each at the slower of its FLOPs and bytes: a memory-bound
        epilogue does not hide under the matmuls."""
        return sum(k.ms() for k in self.kernels)

    def record(self) -> dict[str, Any]:
        return {"flops": self.flops, "bytes": self.bytes, "extra_bytes": self.extra_bytes, "l2_bytes": self.l2_bytes,
                "model_ms": self.model_ms(), "model_ms_per_kernel": self.model_ms_per_kernel(),
                "kernels": [dataclasses.asdict(k) for k in self.kernels]}


def bound_ms(n: int, v: int, h: int, matmuls: int) -> float:
    """The FLOP floor of ``matmuls`` ``[N, V]`` products over ``H`` (3: a loss the library owns, the
    gradient formed in the forward; 4: any upstream gradient, known only in backward)."""
    return 1e3 * matmuls * 2.0 * n * v * h / PEAK_FLOPS


def gemm_l2(m: int, n: int, k: int) -> float:
    """Operand bytes (bf16) a library GEMM ``[m, k] @ [k, n]`` brings into the SMs with 128 x 256 tiles."""
    return BF16 * k * (128 + 256) * -(-m // 128) * -(-n // 256)


def chunk_sizes(n: int, c: int) -> list[tuple[int, int]]:
    """``[(size, count)]``: ``n`` tokens in chunks of ``c``, the last one partial."""
    full, rest = divmod(n, c)
    return [(c, full)] + ([(rest, 1)] if rest else [])


def tiled_design(n: int, v: int, h: int, rows: int, *, loss_path: bool) -> Counted:
    """rlloss's fused paths (``kernels/linear_logprobs.py``): per chunk of C tokens, the rows gathered,
    the fp32 logits tile by the library matmul (bf16 operands, fp32 output), the statistics epilogue
    (reads the tile), the gradient epilogue (reads it, writes bf16 ``d logits`` into it), ``d hidden =
    d logits @ W`` (bf16, rounded once), ``d weight += d logits^T @ h`` (fp32 accumulator, read and
    written). The loss path does all of it in the forward (3 matmuls) and scales the stored gradients
    in backward; the general path recomputes the logits in backward (4 matmuls)."""
    kernels = []
    for c, count in chunk_sizes(n, rows):
        gather = Kernel("gather rows", 0.0, 2 * BF16 * c * h, count)
        logits = Kernel("logits (library)", 2.0 * c * v * h, BF16 * (c * h + v * h) + 4 * c * v, count)
        stats = Kernel("stats epilogue", 0.0, 4.0 * c * v + 4 * 4 * c, count)
        grad = Kernel("grad epilogue", 0.0, (4.0 + BF16) * c * v + 4 * 4 * c, count)
        dh = Kernel("d hidden (library)", 2.0 * c * v * h, BF16 * (c * v + v * h + c * h), count)
        dw = Kernel("d weight (library)", 2.0 * c * v * h, BF16 * (c * v + c * h) + 8.0 * v * h, count)
        kernels += [gather, logits, stats] + ([] if loss_path else [gather, logits]) + [grad, dh, dw]
    tail = [Kernel("pack (sort of the mask)", 0.0, 16.0 * n)]
    if loss_path:  # backward: the stored gradients times the upstream scalar, in the inputs' dtypes
        tail += [Kernel("scale d hidden", 0.0, 2 * BF16 * n * h), Kernel("scale d weight", 0.0, (4 + BF16) * v * h)]
    else:
        tail += [Kernel("d weight to bf16", 0.0, (4 + BF16) * v * h)]
    tile = 4.0 * rows * v
    # forward of the loss path: the tile, d weight's fp32 accumulator, d hidden in bf16 (a gradient);
    # backward: the accumulator and the stored d hidden beside the new gradients
    extra = max(tile + 4.0 * v * h - BF16 * v * h, 4.0 * v * h + (BF16 * n * h if loss_path else 0.0)) + 64.0 * n
    mm = sum(count * (gemm_l2(c, v, h) + gemm_l2(c, h, v) + gemm_l2(v, h, c)) for c, count in chunk_sizes(n, rows))
    l2 = mm + (0.0 if loss_path else sum(count * gemm_l2(c, v, h) for c, count in chunk_sizes(n, rows)))
    return Counted(tuple(kernels + tail), extra, l2)


def trl_design(n: int, v: int, h: int) -> Counted:
    """TRL 1.16's ``ChunkedLogProbFunction`` (``trl/kernels/chunked_logprob.py``): valid tokens gathered
    (``hidden_states[mask]``, a host sync in its trainer); per 4096 x 32768 tile, ``torch.mm`` into a bf16
    tile and a Triton fold of it (online max, sum-exp, entropy); backward recomputes each tile, writes bf16
    ``d logits`` over it in place, ``torch.addmm(..., out_dtype=torch.float32)`` into fp32 ``d hidden``
    (per vocabulary chunk) and ``d weight`` (per token chunk) accumulators; the accumulators rounded at the end."""
    tn, tv = TRL_TILE
    kernels = [Kernel("gather rows (hidden[mask])", 0.0, 2 * BF16 * n * h)]
    for c, count_n in chunk_sizes(n, tn):
        for w, count_v in chunk_sizes(v, tv):
            count = count_n * count_v
            mm = 2.0 * c * w * h
            tile = BF16 * c * w
            kernels += [Kernel("logits (library)", mm, BF16 * (c * h + w * h) + tile, count),
                        Kernel("fold epilogue", 0.0, tile + 4 * 3 * c, count),
                        Kernel("logits again (library)", mm, BF16 * (c * h + w * h) + tile, count),
                        Kernel("d logits in place", 0.0, 2 * tile + 4 * 3 * c, count),
                        Kernel("d hidden += (library)", mm, tile + BF16 * w * h + 8.0 * c * h, count),
                        Kernel("d weight += (library)", mm, tile + BF16 * c * h + 8.0 * w * h, count)]
    kernels += [Kernel("accumulators to bf16", 0.0, (4 + BF16) * (n * h + v * h))]
    extra = BF16 * min(n, tn) * tv + 4.0 * n * h + 4.0 * v * h + 4 * 7 * n
    l2 = sum(cn * cv * (gemm_l2(c, w, h) * 2 + gemm_l2(c, h, w) + gemm_l2(w, h, c))
             for c, cn in chunk_sizes(n, tn) for w, cv in chunk_sizes(v, tv))
    return Counted(tuple(kernels), extra, l2)


def designs(n: int, v: int, h: int, bytes_per_logit: dict[str, float] | None = None) -> dict[str, Counted]:
    """FLOPs, bytes and extra memory of each design at ``n`` tokens (see the module docstring).

    ``bytes_per_logit``: the torch contenders' live bytes per logits-sized element, measured on the
    CPU (``measure``); their extra memory is then ``fixed + bytes_per_logit * elements`` (model).
    """
    from rlloss.kernels.linear_logprobs import default_tile_bytes, tile_tokens

    nv, mm = n * v, 2.0 * n * v * h  # one [N, V] matmul
    inputs = BF16 * (n * h + v * h)  # hidden and weight, read once per pass
    # eager, per [N, V] element: logits (write 2, read 2), fp32 copy (w 4, r 4), log_softmax (w 4, r 4),
    # exp (w 4, r 4), p * lsm (w 4, r 8 + sum 4); backward about as much again in fp32, plus the bf16
    # d logits (w 2, read by two matmuls 4); saved: lsm, p (8) plus a backward fp32 temporary or two (12), d logits 2
    elementwise_fwd = 2 + 4 + 4 + 4 + 4 + 4 + 4 + 12
    elementwise_bwd = 40
    cublas = gemm_l2(n, v, h)

    def torch_design(per_elem_fwd: float, per_elem_bwd: float, extra: float, chunk: int | None) -> Counted:
        kernels = []
        for c, count in chunk_sizes(n, chunk or n):
            m = 2.0 * c * v * h
            kernels += [Kernel("logits (library)", m, BF16 * (c * h + v * h) + BF16 * c * v, count),
                        Kernel("softmax, gather, entropy (elementwise)", 0.0, per_elem_fwd * c * v, count)]
            if chunk:
                kernels.append(Kernel("logits again (library)", m, BF16 * (c * h + v * h) + BF16 * c * v, count))
            kernels += [Kernel("d logits (elementwise)", 0.0, per_elem_bwd * c * v, count),
                        Kernel("d hidden (library)", m, BF16 * (c * v + v * h + c * h), count),
                        Kernel("d weight (library)", m, BF16 * (c * v + c * h) + (8.0 * v * h if chunk else
                                                                                     BF16 * v * h), count)]
        return Counted(tuple(kernels), extra, (4 if chunk else 3) * cublas)

    out = {"eager": torch_design(elementwise_fwd, elementwise_bwd, 22.0 * nv, None)}
    for chunk in (512, 1024):  # verl's and Liger's torch chunking: d weight accumulated in fp32 per chunk
        out[f"chunked-{chunk}"] = torch_design(elementwise_fwd, elementwise_bwd, 22.0 * min(chunk, n) * v
                                               + 4.0 * v * h, chunk)
    out["trl-1.16"] = trl_design(n, v, h)
    # the reference: fp32 logits (a copy of the bf16 product), then token_logprobs and autograd
    out["rlloss-torch"] = torch_design(elementwise_fwd + 8, elementwise_bwd, 26.0 * nv, None)
    rows = tile_tokens(n, v, default_tile_bytes(n, v, h, BF16))
    out["rlloss-fused"] = tiled_design(n, v, h, rows, loss_path=False)
    out["rlloss-fused-loss"] = tiled_design(n, v, h, rows, loss_path=True)
    del inputs
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
    print(f"\nfrom hidden states (bf16 hidden and LM head; log-prob and entropy gradients, the loss path its loss's), "
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
    print(f"\nfrom hidden states at V={V_MODEL}, H={H_MODEL}: extra memory (fused and trl: counted; torch "
          f"contenders: model, their measured bytes per logit times the logits-sized elements they keep), FLOPs and "
          f"bytes (counted), H100 time (model at {PEAK_FLOPS / 1e12:.0f} TFLOP/s and {PEAK_BYTES / 1e12:.0f} TB/s: "
          f"'call' the slower of all FLOPs and all bytes, 'per kernel' each launch at its slower, summed), "
          f"against the FLOP floor of 3 and 4 [N, V] matmuls")
    print(f"{'contender':17} {'N':>6} {'extra GiB':>10} {'TFLOP':>7} {'GB moved':>9} {'call ms':>8} "
          f"{'per kernel':>10} {'x 3mm':>6} {'x 3mm/k':>7} {'x 4mm/k':>7} {'L2->SM TB':>10}")
    for n in N_MODEL:
        b3, b4 = bound_ms(n, V_MODEL, H_MODEL, 3), bound_ms(n, V_MODEL, H_MODEL, 4)
        for name, c in counted[n].items():
            call, per = c.model_ms(), c.model_ms_per_kernel()
            print(f"{name:17} {n:>6} {c.extra_bytes / gib:>10.2f} {c.flops / 1e12:>7.1f} {c.bytes / 1e9:>9.1f} "
                  f"{call:>8.1f} {per:>10.1f} {call / b3:>6.2f} {per / b3:>7.2f} {per / b4:>7.2f} "
                  f"{c.l2_bytes / 1e12:>10.1f}")
        print(f"{'(floor: 3 | 4 mm)':17} {n:>6} {'':>10} {'':>7} {'':>9} {b3:>8.1f} {b4:>10.1f}")
    return {
        "measured_size": dict(zip("NVH", size)),
        "measured_kind": kind,
        "measured": measured,
        "counted_at_measured_size": {k: v.record() for k, v in small.items()},
        "counted_and_model": {str(n): {"bound_3mm_ms": bound_ms(n, V_MODEL, H_MODEL, 3),
                                       "bound_4mm_ms": bound_ms(n, V_MODEL, H_MODEL, 4),
                                       **{k: v.record() for k, v in c.items()}}
                              for n, c in counted.items()},
        "model": {"peak_flops": PEAK_FLOPS, "peak_bytes_per_s": PEAK_BYTES, "V": V_MODEL, "H": H_MODEL},
    }


def run_part(run: Run) -> dict[str, Any]:
    """``bench_loss.py``'s part: the from-hidden-states section (measured on the run's device, modelled at large)."""
    return {"hidden": report(quick=run.quick, reps=min(run.meter.reps, 5), meter=run.meter)}


PART = Part("the from-hidden-states problem", run_part, flag="hidden", help="leave out the from-hidden-states problem")


def host_syncs(fn, inputs: tuple[torch.Tensor, ...]) -> str:
    """One step of a contender under ``torch.cuda.set_sync_debug_mode("error")``: "none", or the first
    host sync it made (the error's first line)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(fn, *inputs)
        return "none"
    except RuntimeError as exc:
        return str(exc).splitlines()[0][:200]
    finally:
        torch.cuda.set_sync_debug_mode(0)


def cuda_record(reps: int, sizes: tuple[int, ...] = N_MODEL) -> dict[str, Any]:
    """The CUDA run the model waits for: every contender at each ``N`` of ``sizes`` (V = 151936, H = 3584,
    bf16), median forward+backward time (CUDA events) and peak extra memory, measured; and the fused
    paths' host syncs (there must be none). Contenders that do not fit (eager's and the reference's
    ``[N, V]`` fp32 tensors at 64k), or whose package is missing (TRL: carry its wheel), say so."""
    meter = Meter.for_device(torch.device("cuda"), reps, 1)
    record: dict[str, Any] = {"environment": environment(torch.device("cuda"), "measured CUDA (CUDA events)"),
                              "reps": reps, "sizes": {}}
    for n in sizes:
        size = (n, V_MODEL, H_MODEL)
        measured = measure(CONTENDERS, size, reps, meter)
        inputs = make_inputs(*size, device="cuda")
        for name in FUSED:
            if "ms" in measured.get(name, {}):
                measured[name]["host_syncs"] = host_syncs(build(name), inputs)
        del inputs
        torch.cuda.empty_cache()
        model = designs(*size)
        record["sizes"][str(n)] = {"measured": measured, "bound_3mm_ms": bound_ms(*size, 3),
                                   "bound_4mm_ms": bound_ms(*size, 4),
                                   "model_ms_per_kernel": {k: c.model_ms_per_kernel() for k, c in model.items()}}
        print(f"\nN={n}: measured on {record['environment']['device']} (CUDA events, median of {reps}) against the "
              f"model's per-kernel time and the 3-matmul floor {bound_ms(*size, 3):.1f} ms")
        for name in CONTENDERS:
            m = measured.get(name, {})
            got = f"{m['ms']:10.1f} ms" if "ms" in m else f"skipped: {m.get('skipped', '?')}"
            print(f"  {name:17} {got}  model {model[name].model_ms_per_kernel():8.1f} ms"
                  + (f"  host syncs: {m['host_syncs']}" if "host_syncs" in m else ""))
    return record


def main() -> int:
    """``python benchmarks/bench_hidden.py [--quick]``: this part alone, JSON in benchmarks/results/.

    On a CUDA machine it is the whole measurement the model waits for (``cuda_record``): every contender at
    N = 16k and 64k, about 5 minutes on an H100 (``--sizes`` for fewer), into
    ``benchmarks/results/bench-hidden-cuda.json`` with the device, date and command. Install rlloss first
    (``python3 -m pip install --no-deps --no-build-isolation -e .``); TRL's contender runs where ``trl``
    imports.
    """
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the smallest CPU size, one repetition")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per contender (default 3)")
    parser.add_argument("--sizes", default=",".join(map(str, N_MODEL)),
                        help="CUDA only: token counts N, comma-separated (default %(default)s)")
    args = parser.parse_args()
    results = Path(__file__).resolve().parent / "results"
    if torch.cuda.is_available() and not args.quick:
        record = cuda_record(args.reps, tuple(int(x) for x in args.sizes.split(",")))
        out = results / "bench-hidden-cuda.json"
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        record = report(quick=args.quick, reps=args.reps, meter=Meter.for_device(device, args.reps, 1))
        out = results / f"bench-hidden-{device.type}{'-quick' if args.quick else ''}.json"
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
