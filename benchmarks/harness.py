"""What every benchmark script shares: clocks, memory meters, measure, sweep, tables, the JSON record.

A leaf: torch and the standard library only, so any script (and the tests) can import it without
pulling in another script. The scripts over it say what they measure; this module says how:

* ``CpuClock`` times a region with ``time.perf_counter``; ``CudaClock`` with CUDA events.
* ``cpu_peak_bytes`` is the peak of allocations minus frees from the profiler's memory events;
  ``cuda_peak_bytes`` reads ``torch.cuda.max_memory_allocated``.
* ``measure`` takes median forward, backward and forward+backward times and one step's peak.
* ``sweep`` measures every contender on every case of a ``Bench`` (how a script turns a case into
  inputs and a contender's name into a loss), the inputs built once per case.
* ``fixed_table`` and ``aligned_table`` print, ``plot_grid`` draws; ``environment`` and ``write_json`` record.
* ``Part`` is one section of ``bench_loss.py``'s report, handed the ``Run`` (device, meter, flags,
  what was skipped): a module adds its section with one entry in ``bench_loss.PARTS``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

PHASES = ("fwd", "bwd", "fwd+bwd")
LossFn = Callable[[torch.Tensor], torch.Tensor]  # the differentiated input (a leaf) -> scalar loss
Peak = Callable[[Callable[[], Any]], int]
Case = TypeVar("Case")


# --- clocks and memory meters ------------------------------------------------------------------

class CpuClock:
    """Wall time of a region, in ms."""

    label = "measured on CPU (time.perf_counter)"

    def time(self, fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3


class CudaClock:
    """Device time of a region, in ms, from CUDA events."""

    label = "measured on CUDA (CUDA events)"

    def time(self, fn: Callable[[], Any]) -> float:
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        return start.elapsed_time(stop)


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """The profiler's C++ side logs every start and stop to file descriptor 2; keep the output readable."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of the bytes allocated and not yet freed while ``fn`` runs, from the profiler's allocation events.

    Each allocation and each free is one event (``alloc_size``, negative for a free) with its time:
    summed in time order they give the live bytes. (The profiler's per-op ``cpu_memory_usage`` holds
    the allocations of every op nested inside, so summing it counts an allocation several times;
    its ``self_cpu_memory_usage`` books a free at the start of the op that frees, before the
    allocations made inside it: both misplace the peak.)
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes: list[tuple[int, int]] = []
    nodes = list(prof.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        if node.tag == _EventType.Allocation:
            sizes.append((node.start_time_ns, node.extra_fields.alloc_size))
        nodes.extend(node.children)
    live = peak = 0
    for _, size in sorted(sizes):
        live += size
        peak = max(peak, live)
    return peak


def cuda_peak_bytes(fn: Callable[[], Any]) -> int:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


@dataclasses.dataclass(frozen=True)
class Meter:
    """How a run measures: the clock, the memory meter, timed repetitions and warm-up steps."""

    clock: CpuClock | CudaClock
    peak: Peak
    reps: int
    warmup: int

    @staticmethod
    def for_device(device: torch.device, reps: int, warmup: int) -> Meter:
        if device.type == "cuda":
            return Meter(CudaClock(), cuda_peak_bytes, reps, warmup)
        return Meter(CpuClock(), cpu_peak_bytes, reps, warmup)

    def with_reps(self, reps: int, warmup: int) -> Meter:
        return dataclasses.replace(self, reps=reps, warmup=warmup)


# --- measure and sweep -------------------------------------------------------------------------

def measure(fn: LossFn, x: torch.Tensor, meter: Meter) -> tuple[dict[str, float], int]:
    """Median forward, backward and forward+backward times of ``fn`` on a leaf copy of ``x``, and
    the peak extra memory of one step."""

    def forward() -> torch.Tensor:
        leaf.grad = None
        return fn(leaf)

    leaf = x.detach().clone().requires_grad_(True)
    for _ in range(meter.warmup):
        forward().backward()
    times: dict[str, list[float]] = {p: [] for p in PHASES}
    for _ in range(meter.reps):
        times["fwd"].append(meter.clock.time(forward))
        loss = forward()
        times["bwd"].append(meter.clock.time(loss.backward))
        times["fwd+bwd"].append(meter.clock.time(lambda: forward().backward()))
    leaf.grad = None
    return {p: statistics.median(v) for p, v in times.items()}, meter.peak(lambda: forward().backward())


@dataclasses.dataclass
class Bench(Generic[Case]):
    """How a script turns a case into inputs and a contender into a loss: what ``sweep`` needs."""

    inputs: Callable[[Case], dict[str, torch.Tensor]]
    build: Callable[[str, Case, dict[str, torch.Tensor]], LossFn]
    leaf: str  # the input differentiated, and measured
    describe: Callable[[Case], str] = str


def sweep(bench: Bench[Case], cases: Sequence[Case], names: Sequence[str], meter: Meter,
          progress: bool = True) -> list[tuple[Case, str, dict[str, float], int]]:
    """(case, contender, median ms per phase, peak extra bytes) for every case and contender."""
    bar = _progress(len(cases) * len(names), progress)
    out = []
    for case in cases:
        inputs = bench.inputs(case)
        for name in names:
            bar.set_description(f"{name} {bench.describe(case)}")
            ms, peak = measure(bench.build(name, case, inputs), inputs[bench.leaf], meter)
            out.append((case, name, ms, peak))
            bar.update(1)
        del inputs
    bar.close()
    return out


def _progress(total: int, enabled: bool) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dev extra; the benchmark works without it
        tqdm = None
    if tqdm is None or not enabled:
        class _Silent:
            def set_description(self, _: str) -> None: ...
            def update(self, _: int) -> None: ...
            def close(self) -> None: ...
        return _Silent()
    return tqdm(total=total, unit="run", file=sys.stderr, leave=False)


_COMPILED: dict[Any, Any] = {}


def compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """One ``torch.compile(fullgraph=True)`` wrapper per function for the whole run, so its cache
    serves every case."""
    if fn not in _COMPILED:
        import torch._dynamo.config as dynamo_config

        # Each (recipe, KL, dtype) is its own graph: without a higher limit dynamo would stop compiling
        # after 8 and silently run eager code under the "compile" label; make that an error instead.
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 256)
        dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 1024)
        if hasattr(dynamo_config, "fail_on_recompile_limit_hit"):
            dynamo_config.fail_on_recompile_limit_hit = True
        _COMPILED[fn] = torch.compile(fn, fullgraph=True)
    return _COMPILED[fn]


# --- tables ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Column:
    """A fixed-width column: its header and a format spec such as ``"<9"`` or ``">10.3f"``."""

    header: str
    spec: str

    def head(self) -> str:
        align, width = re.match(r"([<>^]?)(\d*)", self.spec).groups()
        return f"{self.header:{align}{width}}"


def fixed_table(columns: Sequence[Column], rows: Sequence[Sequence[Any]]) -> str:
    """A header, a rule and one line per row, each cell in its column's format."""
    head = "".join(c.head() for c in columns)
    lines = [head, "-" * len(head)]
    lines += ["".join(f"{v:{c.spec}}" for c, v in zip(columns, row)) for row in rows]
    return "\n".join(lines)


def aligned_table(head: Sequence[str], body: Sequence[Sequence[str]], align: Sequence[str], sep: str = "  ") -> str:
    """Columns as wide as their widest cell, ``align`` one of ``<`` / ``>`` per column."""
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    return "\n".join(sep.join(f"{cell:{a}{w}}" for cell, a, w in zip(line, align, widths)) for line in [head, *body])


Panel = tuple[str, dict[str, list[tuple[float, float]]]]  # a title, and (x, y) points per line label


def plot_grid(grid: Sequence[Sequence[Panel]], path: Path, title: str, xlabel: str, ylabel: str) -> bool:
    """Log-log line plots, a panel per cell of ``grid``, the legend in the first; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows, cols = len(grid), max(len(row) for row in grid)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for i, row in enumerate(grid):
        for j, (panel_title, lines) in enumerate(row):
            ax = axes[i][j]
            for label, points in lines.items():
                if points:
                    ax.plot(*zip(*sorted(points)), marker="o", label=label)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(panel_title)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --- the run's context and the JSON record -----------------------------------------------------

@dataclasses.dataclass
class Run:
    """What every part of ``bench_loss.py`` is handed: the device, how to measure, the flags."""

    device: torch.device
    meter: Meter
    full: bool  # the full sweep (more sizes and cases); else a complete picture in a few minutes
    quick: bool  # one tiny size: a smoke run
    compile: bool  # include the torch.compile contenders
    model: bool  # include the counted traffic and the modelled time
    progress: bool
    skipped: list[str] = dataclasses.field(default_factory=list)  # what this run left out, and why

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def skip(self, what: str) -> None:
        """Say now, and again in the summary, what was left out."""
        print(f"skipped: {what}")
        self.skipped.append(what)


@dataclasses.dataclass(frozen=True)
class Part:
    """One section of the benchmark report: ``run`` prints it and returns its part of the JSON record."""

    name: str
    run: Callable[[Run], dict[str, Any]]
    flag: str  # ``--skip-<flag>`` leaves it out
    help: str = ""


def triton_version() -> str | None:
    """triton's version, or None where it does not import (a broken install counts as absent)."""
    try:
        import triton
    except Exception:
        return None
    return triton.__version__


def environment(device: torch.device, kind: str) -> dict[str, Any]:
    """Where and when the figures were taken."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton_version(),
        "threads": torch.get_num_threads(),
        "kind": kind,
    }


def write_json(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
