"""What every benchmark script shares: clocks, memory meters, measure, sweep, tables, the JSON record.

Over the leaves only: torch, the standard library and ``spread.py``, so any script (and the tests)
can import it without pulling in another script. The scripts over it say what they measure; this
module says how:

* ``CpuClock`` times a region with ``time.perf_counter``; ``CudaClock`` with CUDA events. ``split``
  times two regions back to back (a forward, then the backward of its output) from one start.
* ``cpu_peak_bytes`` is the peak of allocations minus frees from the profiler's memory events;
  ``cuda_peak_bytes`` reads ``torch.cuda.max_memory_allocated``.
* ``measure_together`` times ``reps`` training steps of each contender of a case, the contenders
  taking turns step by step, each step split into its forward and its backward, and takes one
  step's peak memory; ``measure`` does it for one. A step's total is its forward plus its
  backward, so in every run the total is at least each part, and so are the medians and quartiles
  taken over the runs. (Timed in separate calls, as before, each phase's samples came from other
  moments than the total's, and a stall that hit one call and not the other could leave a forward
  above its total: fwd 14.8 ms, bwd 0.57, f+b 1.26 on a loaded 2-core machine; ``bench_loss.py``
  says where the stalls came from.) Python's garbage collector is paused while a region is timed,
  as ``timeit`` does.
* ``timed`` times one callable ``reps`` times the same way: the spread of a single figure.
* ``sweep`` measures every contender on every case of a ``Bench`` (how a script turns a case into
  inputs and a contender's name into a loss), the inputs built once per case.
* ``fixed_table`` and ``aligned_table`` print; ``environment`` and ``write_json`` record;
  ``skip_reason`` says why a contender could not run and how to install what it lacks.
* ``Part`` is one section of ``bench_loss.py``'s report, handed the ``Run`` (device, meter, flags,
  what was skipped): a module adds its section with one entry in ``bench_loss.PARTS``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from spread import Spread

PHASES = ("fwd", "bwd", "fwd+bwd")  # "fwd+bwd" is the step's total: its forward plus its backward
LossFn = Callable[[torch.Tensor], torch.Tensor]  # the differentiated input (a leaf) -> scalar loss
Peak = Callable[[Callable[[], Any]], int]
Case = TypeVar("Case")


# --- clocks and memory meters ------------------------------------------------------------------

class CpuClock:
    """Wall time of a region, in ms (CPU ops run synchronously: the region's end is its work's end)."""

    label = "measured on CPU (time.perf_counter)"

    def time(self, fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    def split(self, first: Callable[[], Any], then: Callable[[Any], Any]) -> tuple[float, float]:
        """ms of ``out = first()`` and of ``then(out)``, run back to back."""
        start = time.perf_counter()
        out = first()
        mid = time.perf_counter()
        then(out)
        return (mid - start) * 1e3, (time.perf_counter() - mid) * 1e3


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

    def split(self, first: Callable[[], Any], then: Callable[[Any], Any]) -> tuple[float, float]:
        """Device ms of the work ``out = first()`` queues and of what ``then(out)`` queues after it."""
        start, mid, stop = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()
        out = first()
        mid.record()
        then(out)
        stop.record()
        torch.cuda.synchronize()
        return start.elapsed_time(mid), mid.elapsed_time(stop)


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
    """How a run measures: the clock, the memory meter, timed repetitions and warm-up steps.

    ``min_seconds``: the timed steps of a case go on past ``reps`` until they span that long (at most
    ``max_reps`` rounds): 15 steps of a 1 ms case last 15 ms, one time slice of a busy scheduler,
    which a single preemption can cover whole; a second of steps samples the machine's load instead.
    """

    clock: CpuClock | CudaClock
    peak: Peak
    reps: int
    warmup: int
    min_seconds: float = 0.0
    max_reps: int = 200

    @staticmethod
    def for_device(device: torch.device, reps: int, warmup: int) -> Meter:
        if device.type == "cuda":
            return Meter(CudaClock(), cuda_peak_bytes, reps, warmup)
        return Meter(CpuClock(), cpu_peak_bytes, reps, warmup)

    def with_reps(self, reps: int, warmup: int) -> Meter:
        return dataclasses.replace(self, reps=reps, warmup=warmup)


# --- measure and sweep -------------------------------------------------------------------------

@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No collection of Python's cyclic garbage inside a timed region (it would land in whichever
    phase happens to cross its threshold); what piled up is collected before."""
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def measure_together(fns: Mapping[str, LossFn], x: torch.Tensor, meter: Meter
                     ) -> dict[str, tuple[dict[str, Spread], int]]:
    """Per contender: the spread of forward, backward and total (their sum, per step) times of
    ``meter.reps`` steps or more (``Meter.min_seconds``) on a leaf copy of ``x``, after
    ``meter.warmup`` untimed steps of each; and one step's peak extra memory.

    The contenders take turns, step by step: step ``r`` of every contender runs before step ``r + 1``
    of any, so a load that comes and goes while a case is measured falls on all of them alike instead
    of on whichever was being timed. Each step starts with no gradient stored (as after
    ``zero_grad(set_to_none=True)``); the leaf is shared, one gradient alive at a time.
    """
    leaf = x.detach().clone().requires_grad_(True)

    def step(fn: LossFn) -> None:
        leaf.grad = None
        fn(leaf).backward()

    for fn in fns.values():
        for _ in range(meter.warmup):  # torch.compile compiles the forward and the backward graph here
            step(fn)
    fwd: dict[str, list[float]] = {name: [] for name in fns}
    bwd: dict[str, list[float]] = {name: [] for name in fns}
    with _gc_paused():
        until, rounds = time.perf_counter() + meter.min_seconds, 0
        while rounds < meter.reps or (rounds < meter.max_reps and time.perf_counter() < until):
            rounds += 1
            for name, fn in fns.items():
                leaf.grad = None
                f, b = meter.clock.split(lambda: fn(leaf), lambda loss: loss.backward())
                fwd[name].append(f)
                bwd[name].append(b)
    leaf.grad = None
    out = {}
    for name, fn in fns.items():
        totals = [f + b for f, b in zip(fwd[name], bwd[name])]
        spreads = {"fwd": Spread.of(fwd[name]), "bwd": Spread.of(bwd[name]), "fwd+bwd": Spread.of(totals)}
        out[name] = (spreads, meter.peak(lambda: step(fn)))
    leaf.grad = None
    return out


def measure(fn: LossFn, x: torch.Tensor, meter: Meter) -> tuple[dict[str, Spread], int]:
    """``measure_together`` for one contender."""
    return measure_together({"": fn}, x, meter)[""]


def timed(clock: CpuClock | CudaClock, fn: Callable[[], Any], reps: int) -> Spread:
    """The spread of ``reps`` timings of ``fn`` (the garbage collector paused, as in ``measure``)."""
    with _gc_paused():
        return Spread.of([clock.time(fn) for _ in range(reps)])


@dataclasses.dataclass
class Bench(Generic[Case]):
    """How a script turns a case into inputs and a contender into a loss: what ``sweep`` needs."""

    inputs: Callable[[Case], dict[str, torch.Tensor]]
    build: Callable[[str, Case, dict[str, torch.Tensor]], LossFn]
    leaf: str  # the input differentiated, and measured
    describe: Callable[[Case], str] = str


def sweep(bench: Bench[Case], cases: Sequence[Case], names: Sequence[str], meter: Meter,
          progress: bool = True) -> list[tuple[Case, str, dict[str, Spread], int]]:
    """(case, contender, spread of ms per phase, peak extra bytes) for every case and contender."""
    bar = _progress(len(cases) * len(names), progress)
    out = []
    for case in cases:
        inputs = bench.inputs(case)
        bar.set_description(bench.describe(case))
        fns = {name: bench.build(name, case, inputs) for name in names}
        for name, (spreads, peak) in measure_together(fns, inputs[bench.leaf], meter).items():
            out.append((case, name, spreads, peak))
        bar.update(len(names))
        del inputs, fns
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


def install_hint(module: str) -> str:
    """How to install the package that provides ``module``: the rlloss extra that pins it (read
    from the installed rlloss's metadata, so the pins have one source, pyproject.toml), else pip."""
    from importlib import metadata

    top = module.split(".")[0]
    dist = top.replace("_", "-")
    try:
        requires = metadata.requires("rlloss") or []
    except metadata.PackageNotFoundError:
        requires = []
    extras: dict[str, list[str]] = {}
    for line in requires:
        m = re.match(r'\s*([A-Za-z0-9_.-]+)([^;]*);.*extra\s*==\s*"([^"]+)"', line)
        if m:
            extras.setdefault(m.group(3), []).append(m.group(1) + m.group(2).strip())

    def names_it(req: str) -> bool:
        return re.split(r"[<>=!~ \\[]", req)[0].lower() == dist.lower()

    named = [e for e, reqs in extras.items() if any(map(names_it, reqs))]
    for extra in sorted(named, key=lambda e: e == "dev"):  # the extra made for it before the dev tools
        pins = extras[extra] if extra != "dev" else [r for r in extras[extra] if names_it(r)]
        return f'pip install -e ".[{extra}]" from the repository root ({", ".join(pins)})'
    return f"pip install {dist}"


_INSTALLED = re.compile(r"[/\\](?:site|dist)-packages[/\\]([A-Za-z0-9_]+)")


def _import_failure(exc: BaseException) -> tuple[str, str] | None:
    """(the installed package whose import of another failed, the package that raised), when ``exc``
    was raised while a module was being imported; else None."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    packages = [m.group(1) if m else None for m in (_INSTALLED.search(f.filename) for f in frames)]
    # a module body running (Python hides the import machinery's own frames, not the module's), or
    # importlib called by name; the first frame is where the exception was caught, never an import
    first_import = next((i for i, f in enumerate(frames)
                         if i and (f.name == "<module>" or "importlib" in f.filename)), None)
    if first_import is None:
        return None
    importer = next((p for p in reversed(packages[:first_import]) if p), packages[first_import])
    culprit = next((p for p in reversed(packages) if p), None)
    return (importer, culprit) if importer and culprit else None


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return " " + metadata.version(package.replace("_", "-"))
    except metadata.PackageNotFoundError:
        return ""


def skip_reason(exc: BaseException) -> str:
    """Why a contender could not run, in one line; for a package that is missing or does not import,
    how to install it. A package that raises while it is imported counts as not importing (trl 1.16
    under transformers < 5.11 does, lazily, when Hugging Face's ``kernels`` is 0.19)."""
    if isinstance(exc, ImportError) and exc.name:
        top = exc.name.split(".")[0]
        what = f"{top} is not installed" if isinstance(exc, ModuleNotFoundError) and exc.name == top \
            else f"{top} does not import ({exc})"[:160]
        return f"{what}; to run it: {install_hint(top)}"
    failure = _import_failure(exc)
    if failure:
        importer, culprit = failure
        return (f"{importer}{_version(importer)} does not import here: {type(exc).__name__} in "
                f"{culprit}{_version(culprit)} ({exc})"[:200] + f"; the tested versions: {install_hint(importer)}")
    return f"{type(exc).__name__}: {exc}"[:200]


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
