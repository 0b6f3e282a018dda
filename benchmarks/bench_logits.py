"""The from-logits problem: the policy loss computed from ``[B, T, V]`` logits, forward and backward.

Contenders (``CONTENDERS``): ``rlloss-torch`` (``policy_loss_from_logits(backend="torch")``:
log_softmax, gather, the loss), ``rlloss-compile`` (the same reference under ``torch.compile``),
``rlloss-triton`` (the fused vocabulary-streaming kernels; CUDA only) and ``liger-triton``
(Liger-Kernel's ``triton_grpo_loss``, the peer; CUDA only, when ``liger_kernel`` imports). Timed as
the policy loss is (``harness.measure_together``: forward and backward of the same step, the
contenders taking turns; medians and quartiles). On the CPU only the smallest size runs (4096
tokens, V=32768: 256 MiB of bf16 logits; 2048 tokens without ``--full``). The counted section counts
launches and bytes at a small size, where the interpreter is quick, and the modelled H100 time
scales those bytes to the GPU sizes in proportion to tokens x vocabulary (the logits dominate every
term).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

import harness
import problems
import rlloss
from harness import Column, Part, Run
from spread import Ratio, Spread
from roofline import HBM_BYTES_PER_S, LAUNCH_US
from traffic import count_torch_ops, count_triton, interpreter_active

CPU_SIZES = ((4096, 32768),)  # --full
CPU_DEFAULT_SIZES = ((2048, 32768),)  # a step of the eager reference takes seconds on the CPU: half of it
GPU_SIZES = tuple((n, v) for v in (32768, 151936) for n in (4096, 16384, 65536))
QUICK_SIZES = ((256, 4096),)
COUNT_SIZE = (2, 128, 4096)  # B, T, V for the counted section
LOSS_OPTIONS = {"eps_low": 0.2, "eps_high": 0.28, "aggregation": "token_mean"}  # DAPO
CONTENDERS = ("rlloss-torch", "rlloss-compile", "rlloss-triton", "liger-triton")


def build(name: str, inputs: dict[str, torch.Tensor], *, compile: bool = True) -> harness.LossFn:
    """The loss of contender ``name`` as a function of the logits; ``compile=False`` runs the
    compile contender's computation uncompiled."""
    args = (inputs["ids"], inputs["old_logp"], inputs["adv"], inputs["mask"])
    if name in ("rlloss-torch", "rlloss-triton"):
        backend = name.removeprefix("rlloss-")
        return lambda logits: rlloss.policy_loss_from_logits(logits, *args, backend=backend, **LOSS_OPTIONS).loss
    if name == "rlloss-compile":
        reference = problems.logits_reference(LOSS_OPTIONS)
        step = torch.compile(reference, fullgraph=True) if compile else reference
        return lambda logits: step(logits, *args)
    if name == "liger-triton":
        return liger_loss(inputs)
    raise ValueError(f"unknown contender {name!r}")


def liger_loss(inputs: dict[str, torch.Tensor]) -> harness.LossFn:
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


def contenders(on_gpu: bool, with_compile: bool, skipped: list[str] | None = None) -> list[str]:
    """The contenders this machine runs; what it cannot run is printed and added to ``skipped``."""
    names = ["rlloss-torch"] + (["rlloss-compile"] if with_compile else [])
    left = why = None
    if on_gpu:
        names.append("rlloss-triton")
        try:
            import liger_kernel  # noqa: F401

            names.append("liger-triton")
        except ImportError:
            left = "liger-triton"
            why = f"liger_kernel is not installed; to run it: {harness.install_hint('liger_kernel')}"
    else:
        left, why = "rlloss-triton and liger-triton", "no CUDA device"
    if left:
        print(f"from logits: {left} skipped: {why}")
        if skipped is not None:
            skipped.append(f"from logits: {left} ({why})")
    return names


@dataclasses.dataclass
class LogitsRow:
    tokens: int
    vocab: int
    contender: str
    ms: dict[str, float]  # medians per phase
    spread: dict[str, dict[str, float]]  # per phase: Spread.as_dict()
    peak_extra_bytes: int


def sweep(names: list[str], sizes: tuple[tuple[int, int], ...], device: torch.device, meter: harness.Meter,
          progress: bool = False) -> list[LogitsRow]:
    bench = harness.Bench(inputs=lambda size: problems.logits_inputs(*size, device),
                          build=lambda name, _, inputs: build(name, inputs), leaf="logits",
                          describe=lambda size: f"from logits {size[0]}x{size[1]}")
    return [LogitsRow(tokens, vocab, name, {p: s.median for p, s in spreads.items()},
                      {p: s.as_dict() for p, s in spreads.items()}, peak)
            for (tokens, vocab), name, spreads, peak in harness.sweep(bench, sizes, names, meter, progress)]


def table(rows: list[LogitsRow]) -> str:
    """One line per size and contender; ``x torch``: rlloss-torch's total time over this one's, with
    the range of their quartiles (``spread.Ratio``)."""
    total = lambda r: Spread.from_dict(r.spread["fwd+bwd"])  # noqa: E731
    base = {(r.tokens, r.vocab): total(r) for r in rows if r.contender == "rlloss-torch"}
    columns = [Column("tokens", ">8"), Column("V", ">8"), Column("contender", ">15"), Column("fwd ms", ">10.1f"),
               Column("bwd ms", ">10.1f"), Column("total ms", ">10.1f"), Column("IQR %", ">7.0f"),
               Column("x torch [range]", ">22"), Column("peak MiB", ">10.1f")]
    return harness.fixed_table(columns, [
        (r.tokens, r.vocab, r.contender, r.ms["fwd"], r.ms["bwd"], r.ms["fwd+bwd"], 100 * total(r).rel_iqr,
         "(the base)" if r.contender == "rlloss-torch" else str(Ratio.of(base[(r.tokens, r.vocab)], total(r))),
         r.peak_extra_bytes / 2**20) for r in rows])


def counted_and_modelled(target: tuple[int, int] = (65536, 151936)) -> dict[str, Any]:
    """Count launches and bytes of forward+backward at COUNT_SIZE; model the H100 at ``target``."""
    b, t, v = COUNT_SIZE
    inputs = problems.logits_inputs(b * t, v, torch.device("cpu"))
    logits = inputs["logits"]
    # the least any backend can move: the logits read once, d/dlogits written once, the small inputs once
    small = sum(x.numel() * x.element_size() for k, x in inputs.items() if k != "logits")
    minimum = 2 * logits.numel() * logits.element_size() + small
    out: dict[str, Any] = {"size": [b, t, v], "minimum_bytes": minimum, "rows": []}
    for name in ("rlloss-torch", "rlloss-triton"):
        if name == "rlloss-triton" and not interpreter_active():
            continue
        fn = build(name, inputs)
        leaf = logits.detach().clone().requires_grad_(True)

        seed = torch.ones((), dtype=torch.float32)  # the incoming gradient belongs to the caller

        def step() -> None:
            leaf.grad = None  # a fresh gradient is stored, not added to an old one
            torch.autograd.backward(fn(leaf), seed)

        counter = count_triton if name == "rlloss-triton" else count_torch_ops
        # Triton's interpreter computes every lane of a block, the masked ones too (a log of 0, a 0/0 a GPU
        # computes silently and never stores): numpy's warnings there say nothing about the results
        with np.errstate(divide="ignore", invalid="ignore"):
            step()
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


def time_and_count(run: Run) -> dict[str, Any]:
    """``bench_loss.py``'s part: the timed from-logits table, then the counted and modelled section."""
    names = contenders(run.on_gpu, with_compile=run.compile, skipped=run.skipped)
    sizes = QUICK_SIZES if run.quick else GPU_SIZES if run.on_gpu else CPU_SIZES if run.full else CPU_DEFAULT_SIZES
    if sizes == CPU_DEFAULT_SIZES:
        run.skip(f"from logits at {CPU_SIZES[0][0]} tokens x V={CPU_SIZES[0][1]}: timed at {sizes[0][0]} tokens "
                 "instead (--full times it)")
    meter = run.meter.with_reps(run.meter.reps if run.on_gpu else min(run.meter.reps, 3), warmup=1)
    rows = sweep(names, sizes, run.device, meter)
    print(f"\nfrom logits (bf16 logits, DAPO loss), medians of {meter.reps} steps after 1 warm-up, each timed as its "
          f"forward and its backward (total = their sum); {meter.clock.label}")
    print(table(rows))
    record: dict[str, Any] = {"logits_rows": [dataclasses.asdict(r) for r in rows]}
    if run.model:
        record["logits_model"] = counted_and_modelled()
    else:
        run.skip("from logits: the counted and modelled section (--skip-model)")
    return record


PART = Part("the from-logits problem", time_and_count, flag="logits", help="leave out the from-logits problem")
