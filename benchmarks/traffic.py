"""Kernel launches and memory traffic of ``policy_loss`` forward + backward, counted, not guessed.

* PyTorch code (the eager reference, the TRL-style inline loss, and the torch ops that the Triton
  backend's Python wrapper issues): a ``TorchDispatchMode`` sees every aten op. An op that computes
  counts as one launch (on a GPU each is one kernel) and moves the bytes of its tensor inputs and
  outputs. Views and other metadata-only ops (``view``, ``expand``, ``select``, ``detach``, ...)
  and bare allocations (``empty``, ``empty_like``, ...) move nothing and do not count. A broadcast
  input (a stride-0 dimension) counts the elements actually stored, not the broadcast size.
  ``.item()`` (``_local_scalar_dense``) is a device synchronisation: counted apart, as ``syncs``.
* Triton kernels, in Triton's interpreter (``TRITON_INTERPRET=1``): every launch counts once
  (not once per program), and each ``tl.load``/``tl.store`` moves (active lanes) x (element size)
  bytes; masked-off lanes move nothing. Torch's own copies of the arguments made by the
  interpreter are not counted. A value that several programs of one launch load (a scalar such as
  the incoming gradient, read by every program) is counted once per program: that is the traffic
  the kernel issues; on a GPU caches absorb some of it.

``minimum_bytes`` is the floor for one forward + backward: every input read once as stored (logp,
old_logp, adv, the mask as bool bytes, ref_logp when the recipe has a KL term), the gradient of
logp written once in logp's dtype, and the fp32 scalar loss written.

Usage::

    python benchmarks/traffic.py                            # GRPO, DAPO, Dr. GRPO, GSPO at 16 x 1024
    python benchmarks/traffic.py --b 16 --t 1024 --mask prefix --out benchmarks/results/traffic.json

Without a GPU the script sets ``TRITON_INTERPRET=1`` itself (before triton is imported) so the
Triton backend runs, and is counted, in the interpreter on CPU tensors. On a CUDA machine without
``TRITON_INTERPRET=1`` the compiled kernels cannot be instrumented: the Triton rows are left out
and the script says so (set ``TRITON_INTERPRET=1`` to count them on CPU tensors).
"""

from __future__ import annotations

import os

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import aligned_table  # noqa: E402
from problems import Problem, loss_options, make_problem, rlloss_loss, trl_loss  # noqa: E402

METHOD = "counted (aten ops via TorchDispatchMode; Triton interpreter loads/stores)"

# Ops that allocate without computing: no kernel runs, no byte moves.
_ALLOCATIONS = {
    "empty.memory_format", "empty.names", "empty_like.default", "empty_strided.default", "new_empty.default",
    "new_empty_strided.default", "resize_.default",
}
# Aliasing or metadata-only ops whose schema does not mark them as views.
_METADATA = {"_unsafe_view.default", "_reshape_alias.default", "set_.source_Storage_storage_offset",
             "set_.source_Storage", "set_.source_Tensor", "set_.default", "lift_fresh.default"}
# In-place ops that overwrite their mutated argument without reading it.
_WRITE_ONLY = {"copy_", "fill_", "zero_", "normal_", "uniform_", "random_", "bernoulli_", "exponential_"}
# a tensor's value read on the host: ``.item()``, ``int()``, ``bool()``. Outside an op it reaches the recorder as
# _local_scalar_dense; inside an op's body (below autograd, where item is not decomposed) as item or is_nonzero
_SYNCS = {"_local_scalar_dense.default", "item.default", "is_nonzero.default"}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel reaches in ``t``: stored elements only (a stride-0, broadcast dimension adds nothing)."""
    if t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


@dataclasses.dataclass
class Launch:
    """One kernel launch: an aten op that computes, or one Triton launch (all its programs)."""

    name: str
    kind: str  # "aten" | "triton"
    bytes_read: int = 0
    bytes_written: int = 0
    programs: int | None = None  # Triton grid size

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


@dataclasses.dataclass
class Counts:
    """What ran inside a counted region, in order."""

    launches: list[Launch] = dataclasses.field(default_factory=list)
    syncs: int = 0
    not_counted: Counter = dataclasses.field(default_factory=Counter)  # views and allocations seen
    # bytes of explicit allocations (torch.empty & co.): for the fused path, every buffer it creates
    allocated_bytes: int = 0

    @property
    def n_launches(self) -> int:
        return len(self.launches)

    @property
    def bytes_read(self) -> int:
        return sum(x.bytes_read for x in self.launches)

    @property
    def bytes_written(self) -> int:
        return sum(x.bytes_written for x in self.launches)

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    def table(self) -> str:
        """One line per launch: name, bytes read and written."""
        width = max([len(x.name) for x in self.launches] + [4])
        lines = [f"  {'#':>3}  {'launch':<{width}}  {'read':>10}  {'written':>10}"]
        for i, x in enumerate(self.launches):
            lines.append(f"  {i:>3}  {x.name:<{width}}  {x.bytes_read:>10,}  {x.bytes_written:>10,}")
        lines.append(f"  {'':>3}  {'total':<{width}}  {self.bytes_read:>10,}  {self.bytes_written:>10,}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "launches": self.n_launches, "bytes": self.bytes, "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written, "syncs": self.syncs, "allocated_bytes": self.allocated_bytes,
            "per_launch": [dataclasses.asdict(x) for x in self.launches],
            "not_counted": dict(sorted(self.not_counted.items())),
        }


def _op_key(func: Any) -> str:
    return f"{func._schema.name.split('::')[-1]}.{func._overloadname}"


class _AtenRecorder(TorchDispatchMode):
    """Records every aten op that computes, with the bytes of its tensor inputs and outputs."""

    def __init__(self, counts: Counts) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        body = _custom_op_body(func)
        if body is not None:  # an rlloss op is no launch itself: what it runs inside is counted
            with self:
                return body(*args, **kwargs)
        out = func(*args, **kwargs)
        key = _op_key(func)
        if key in _SYNCS:
            self.counts.syncs += 1
        elif key in _ALLOCATIONS:
            self.counts.not_counted[key] += 1
            self.counts.allocated_bytes += sum(tensor_bytes(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        elif func.is_view or key in _METADATA or not any(
            isinstance(x, torch.Tensor) for x in tree_leaves(out)
        ):  # no tensor out and no sync: a metadata query (sizes, strides)
            self.counts.not_counted[key] += 1
        else:
            self.counts.launches.append(Launch(f"aten.{key}", "aten", *_aten_bytes(func, args, kwargs, out)))
        return out


def _custom_op_body(func: Any) -> Callable | None:
    """The Python body of an ``rlloss::`` custom op (``torch.library.custom_op``), else None."""
    if func.namespace != "rlloss":
        return None
    from torch._library.custom_ops import OPDEFS

    opdef = OPDEFS.get(func._schema.name)
    return None if opdef is None else opdef._init_fn


def _aten_bytes(func: Any, args: tuple, kwargs: dict, out: Any) -> tuple[int, int]:
    """(read, written): tensor arguments are read (write-only destinations are not), tensor outputs written."""
    schema = func._schema
    base = schema.name.split("::")[-1]
    write_only = set()
    for i, arg in enumerate(schema.arguments):
        info = arg.alias_info
        destination = base in _WRITE_ONLY or (arg.kwarg_only and arg.name.startswith("out"))
        if info is not None and info.is_write and destination:
            write_only.add(i)
    read = 0
    for i, arg in enumerate(schema.arguments):
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        if i in write_only:
            continue
        read += sum(tensor_bytes(t) for t in tree_leaves(value) if isinstance(t, torch.Tensor))
    written = sum(tensor_bytes(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
    return read, written


def interpreter_active() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET`` set before triton's import)."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return False
    try:
        import triton  # noqa: F401
        from triton.runtime.interpreter import GridExecutor  # noqa: F401
    except Exception:
        return False
    return True


NO_INTERPRETER = ("Triton launches are counted in Triton's interpreter only: set TRITON_INTERPRET=1 before triton "
                  "is imported (CPU tensors); compiled CUDA kernels cannot be instrumented this way")


def _lanes_and_size(ptrs: Any, mask: Any) -> tuple[int, int]:
    import numpy as np

    ty = ptrs.get_element_ty()
    size = max(1, (ty.primitive_bitwidth + 7) // 8)
    active = int(np.count_nonzero(np.broadcast_to(mask.data, ptrs.data.shape)))
    return active, size


class _AllLanes:
    """A mask handle whose every lane is on (an unmasked atomic)."""

    data = True


@contextlib.contextmanager
def _instrument_interpreter(counts: Counts) -> Iterator[None]:
    """Count Triton launches and the bytes of their loads and stores while the context is open."""
    from triton.runtime import interpreter as interp

    builder = interp.InterpreterBuilder
    originals = {
        "load": builder.create_masked_load, "store": builder.create_masked_store,
        "rmw": builder.create_atomic_rmw, "cas": builder.create_atomic_cas, "call": interp.GridExecutor.__call__,
    }
    current: list[Launch] = []

    # create_load/create_store build an all-true mask and call the masked versions: patched once here.
    def masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        if current:
            lanes, size = _lanes_and_size(ptrs, mask)
            current[-1].bytes_read += lanes * size
        return originals["load"](self, ptrs, mask, other, cache_policy, is_volatile)

    def masked_store(self, ptrs, value, mask, cache_policy):
        if current:
            lanes, size = _lanes_and_size(ptrs, mask)
            current[-1].bytes_written += lanes * size
        return originals["store"](self, ptrs, value, mask, cache_policy)

    def atomic_rmw(self, rmw_op, ptr, val, mask, sem, scope):  # read-modify-write: both ways
        if current:
            lanes, size = _lanes_and_size(ptr, mask)
            current[-1].bytes_read += lanes * size
            current[-1].bytes_written += lanes * size
        return originals["rmw"](self, rmw_op, ptr, val, mask, sem, scope)

    def atomic_cas(self, ptr, cmp, val, sem, scope):
        if current:
            lanes, size = _lanes_and_size(ptr, _AllLanes())
            current[-1].bytes_read += lanes * size
            current[-1].bytes_written += lanes * size
        return originals["cas"](self, ptr, cmp, val, sem, scope)

    def launch(self, *args, **kwargs):
        grid = self.grid if isinstance(self.grid, tuple) else None
        programs = None
        if grid is not None:
            programs = 1
            for g in grid:
                programs *= int(g)
        current.append(Launch(f"triton.{self.fn.__name__}", "triton", programs=programs))
        counts.launches.append(current[-1])
        try:
            with _disable_current_modes():  # the interpreter's host copies of the arguments are not traffic
                return originals["call"](self, *args, **kwargs)
        finally:
            current.pop()

    builder.create_masked_load = masked_load
    builder.create_masked_store = masked_store
    builder.create_atomic_rmw = atomic_rmw
    builder.create_atomic_cas = atomic_cas
    interp.GridExecutor.__call__ = launch
    try:
        yield
    finally:
        builder.create_masked_load = originals["load"]
        builder.create_masked_store = originals["store"]
        builder.create_atomic_rmw = originals["rmw"]
        builder.create_atomic_cas = originals["cas"]
        interp.GridExecutor.__call__ = originals["call"]


def count_torch_ops(fn: Callable[[], Any]) -> Counts:
    """Run ``fn`` (forward and backward inside it) and count the aten ops it dispatches.

    Should ``fn`` launch Triton kernels in the interpreter, they are counted as by ``count_triton``
    (otherwise the interpreter's host copies of their arguments would pass for aten traffic).
    """
    counts = Counts()
    with _instrument_interpreter(counts) if interpreter_active() else contextlib.nullcontext(), _AtenRecorder(counts):
        fn()
    return counts


def count_triton(fn: Callable[[], Any]) -> Counts:
    """Run ``fn`` with Triton's interpreter instrumented: its launches and their load/store bytes,
    plus the aten ops around them (the Python wrapper's torch ops count as launches too).

    Raises ``RuntimeError`` when the interpreter is not in use (a CUDA run without TRITON_INTERPRET=1).
    """
    if not interpreter_active():
        raise RuntimeError(NO_INTERPRETER)
    counts = Counts()
    with _instrument_interpreter(counts), _AtenRecorder(counts):
        fn()
    return counts


# ---------------------------------------------------------------------------------------------
# minimum traffic, a counted step


def minimum_bytes(problem: Any, recipe: Any) -> int:
    """Each input read once as stored, the gradient written once in logp's dtype, the fp32 loss written."""
    inputs = [problem.logp, problem.old_logp, problem.adv, problem.mask]
    if recipe.beta != 0:
        inputs.append(problem.ref_logp)
    read = sum(tensor_bytes(x) for x in inputs if x is not None)
    written = tensor_bytes(problem.logp) + 4
    return read + written


def fwd_bwd(loss_fn: Callable[[torch.Tensor], torch.Tensor], problem: Any) -> Callable[[], None]:
    """A step: ``loss_fn(logp)`` then backward with a ones seed made outside the step.

    The seed gradient and the fresh leaf are made once here, outside any counted region: the
    incoming gradient of a loss belongs to the caller (``loss.backward()`` would add one fill).
    The step runs once here too, so later (counted) calls see no first-call effects.
    """
    logp = problem.logp.detach().clone().requires_grad_(True)
    loss = loss_fn(logp)
    seed = torch.ones_like(loss)
    torch.autograd.backward(loss, seed)

    def step() -> None:
        logp.grad = None
        torch.autograd.backward(loss_fn(logp), seed)

    return step


BACKENDS = ("torch", "triton", "trl-inline")


def count_backend(problem: Any, recipe: Any, backend: str) -> Counts:
    """Counted forward + backward of one backend on one problem."""
    tensors = (problem.old_logp, problem.adv, problem.mask, problem.ref_logp)
    if backend == "trl-inline":
        return count_torch_ops(fwd_bwd(trl_loss(*tensors, recipe), problem))
    step = fwd_bwd(rlloss_loss(*tensors, recipe, backend), problem)
    return count_triton(step) if backend == "triton" else count_torch_ops(step)


# ---------------------------------------------------------------------------------------------
# the loss from logits


@dataclasses.dataclass
class LogitsProblem:
    """Inputs of ``policy_loss_from_logits``: ``[B, T, V]`` logits and the loss inputs."""

    logits: torch.Tensor
    ids: torch.Tensor
    loss: Problem


def make_logits_problem(b: int, t: int, v: int, dtype: torch.dtype, device: torch.device | str = "cpu", *,
                        mask: str = "full", seed: int = 0) -> LogitsProblem:
    """Random logits (scale 3) in ``dtype``, sampled-looking ids, and ``make_problem``'s loss inputs (fp32 log-probs)."""
    gen = torch.Generator().manual_seed(seed + 1)
    logits = (3 * torch.randn(b, t, v, generator=gen)).to(device=device, dtype=dtype)
    ids = torch.randint(0, v, (b, t), generator=gen).to(device)
    return LogitsProblem(logits.requires_grad_(True), ids, make_problem(b, t, torch.float32, device, mask=mask,
                                                                        seed=seed))


def minimum_bytes_from_logits(problem: LogitsProblem, recipe: Any) -> int:
    """The logits read once and their gradient written once, plus the loss inputs read once and the loss."""
    p = problem.loss
    inputs = [problem.logits, problem.ids, p.old_logp, p.adv, p.mask] + ([p.ref_logp] if recipe.beta != 0 else [])
    return sum(tensor_bytes(x) for x in inputs) + tensor_bytes(problem.logits) + 4


def count_from_logits(problem: LogitsProblem, recipe: Any, backend: str, entropy_coef: float = 0.01) -> Counts:
    """Counted forward + backward of ``policy_loss_from_logits`` (run once first, uncounted)."""
    import rlloss

    p = problem.loss
    kw = loss_options(recipe, p.logp.shape[1])
    if recipe.beta != 0:
        kw["ref_logp"] = p.ref_logp
    logits = problem.logits.detach().clone().requires_grad_(True)

    def loss_fn() -> torch.Tensor:
        return rlloss.policy_loss_from_logits(logits, problem.ids, p.old_logp, p.adv, p.mask, entropy_coef=entropy_coef,
                                              backend=backend, **kw).loss

    seed = torch.ones(())
    torch.autograd.backward(loss_fn(), seed)

    def step() -> None:
        logits.grad = None
        torch.autograd.backward(loss_fn(), seed)

    return count_triton(step) if backend == "triton" else count_torch_ops(step)


# ---------------------------------------------------------------------------------------------
# CLI


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:,.3f} MiB"


def main(argv: list[str] | None = None) -> int:
    from rlloss.recipes import DAPO, DR_GRPO, GRPO, GSPO

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--b", type=int, default=16, help="rows (default 16)")
    parser.add_argument("--t", type=int, default=1024, help="tokens per row (default 1024)")
    parser.add_argument("--mask", choices=("full", "prefix"), default="full",
                        help="full: every token valid (default); prefix: right padding, lengths in [T/4, T]")
    parser.add_argument("--out", type=Path, default=None, help="also write the counts as JSON here")
    parser.add_argument("--per-launch", action="store_true", help="print every launch with its bytes")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    interp = interpreter_active()
    device = torch.device("cpu") if interp or not torch.cuda.is_available() else torch.device("cuda")
    backends = [b for b in BACKENDS if b != "triton" or interp]
    if not interp:
        print(f"note: the triton backend is not counted here. {NO_INTERPRETER}.", file=sys.stderr)
    recipes = (GRPO, DAPO, DR_GRPO, GSPO)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    rows = []
    for recipe in recipes:
        for dname, dtype in dtypes.items():
            problem = make_problem(args.b, args.t, dtype, device, mask=args.mask)
            floor = minimum_bytes(problem, recipe)
            for backend in backends:
                t0 = time.perf_counter()
                c = count_backend(problem, recipe, backend)
                rows.append({"recipe": recipe.name, "dtype": dname, "backend": backend, **c.to_json(),
                             "minimum_bytes": floor, "ratio": c.bytes / floor,
                             "seconds": time.perf_counter() - t0})
                if args.per_launch:
                    print(f"{recipe.name} {dname} {backend}:\n{c.table()}")
    elapsed = time.perf_counter() - started

    print(f"policy_loss forward + backward, B={args.b} T={args.t}, mask={args.mask}: {METHOD}")
    head = ("recipe", "dtype", "backend", "launches", "syncs", "bytes moved", "minimum bytes", "ratio")
    body = [(r["recipe"], r["dtype"], r["backend"], str(r["launches"]), str(r["syncs"]), _fmt_bytes(r["bytes"]),
             _fmt_bytes(r["minimum_bytes"]), f"{r['ratio']:.2f}x") for r in rows]
    print(aligned_table(head, body, ["<", "<", "<", ">", ">", ">", ">", ">"]))
    print(f"(minimum: each input read once, the gradient written once, the fp32 loss; counted in {elapsed:.1f} s)")
    if not interp:
        print(f"triton backend not counted: {NO_INTERPRETER}")

    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "method": METHOD, "b": args.b, "t": args.t, "mask": args.mask, "device": str(device),
            "triton_interpreter": interp, "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "minimum": "each input read once as stored, the gradient written once in logp's dtype, the fp32 loss",
            "seconds": elapsed,
        }
        if interp:
            import triton

            meta["triton"] = triton.__version__
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
