"""Capturing the kernel launches of the public API, specialised as a GPU launch would be.

``capture_child`` runs in a child process with ``TRITON_INTERPRET=1``: it calls every scenario of
``gpu_scenarios.py`` and intercepts every kernel launch where Triton's interpreter takes it
(``InterpretedFunction.run``, what ``kernel[grid](...)`` reaches), whatever Python wraps the
launch (an ``autograd.Function``, a ``torch.library`` op). Each launch is specialised with
Triton's own launch-time binder (``triton.runtime.jit.create_function_from_signature`` with the
CUDA backend), exactly as ``JITFunction.run`` does on a GPU: pointer and integer types,
``tt.divisibility=16`` for pointers aligned to 16 bytes and integers divisible by 16, integers
equal to 1 turned into constants, constexpr values and ``num_warps``. The distinct
specialisations are written as JSON; ``launched_kernels`` lists, from the sources, every kernel
they must cover.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any


def encode_constexpr(value: Any) -> Any:
    """A constexpr value as JSON (tl dtypes as {"tl_dtype": name})."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if type(value).__name__ == "dtype" and hasattr(value, "primitive_bitwidth"):
        return {"tl_dtype": str(value)}
    raise TypeError(f"cannot record constexpr value {value!r} of type {type(value)}")


def decode_constexpr(value: Any) -> Any:
    if isinstance(value, dict) and "tl_dtype" in value:
        import triton.language as tl

        return tl.dtype(value["tl_dtype"])
    return value


def capture_child(out_path: str, execute: bool) -> None:
    """Run every scenario under the interpreter and write the specialised launches as JSON."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from gpu_scenarios import scenarios  # torch and rlloss: only here, under the interpreter

    # Specialisation is the backend-independent part of BaseBackend: the same for sm_80 and sm_90a.
    backend = CUDABackend(GPUTarget("cuda", 90, 32))
    binders: dict[tuple[str, str], tuple[Any, Any]] = {}
    configs: dict[str, dict[str, Any]] = {}
    current = {"scenario": None}
    original_run = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        key = (self.fn.__module__, self.fn.__qualname__)
        if key not in binders:
            jf = JITFunction(self.fn, **self.kwargs)  # what @triton.jit builds without the interpreter
            binders[key] = (jf, create_function_from_signature(jf.signature, jf.params, backend))
        jf, binder = binders[key]
        if "INTERPRETER_BF16" in kwargs:  # the interpreter's bf16 tl.dot workaround: never taken on a GPU
            kwargs = {**kwargs, "INTERPRETER_BF16": False}
        bound, specialization, launch_options = binder(*args, **kwargs)
        _, signature, constexprs, attrs = jf._pack_args(backend, dict(launch_options), bound, specialization,
                                                       launch_options)
        record = {
            "module": key[0],
            "kernel": key[1],
            "signature": signature,
            "constexprs": [[list(p), encode_constexpr(v)] for p, v in sorted(constexprs.items())],
            "attrs": [[list(p), a] for p, a in sorted(attrs.items()) if a],
            "options": dict(sorted(launch_options.items())),
        }
        ident = json.dumps(record, sort_keys=True)
        entry = configs.setdefault(ident, {**record, "scenarios": [], "grids": []})
        if current["scenario"] not in entry["scenarios"]:
            entry["scenarios"].append(current["scenario"])
        g = grid(bound) if callable(grid) else grid
        if list(g) not in entry["grids"]:
            entry["grids"].append(list(g))
        if execute:
            return original_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        return None

    InterpretedFunction.run = run
    failures = []
    names = []
    for name, thunk in scenarios():
        current["scenario"] = name
        names.append(name)
        try:
            thunk()
        except Exception as exc:  # reported, and the parent fails on it
            failures.append({"scenario": name, "error": f"{type(exc).__name__}: {exc}"})
    captured = {(c["module"], c["kernel"]) for c in configs.values()}
    launched = launched_kernels()
    Path(out_path).write_text(json.dumps({
        "triton": triton.__version__,
        "scenarios": names,
        "failures": failures,
        "launched_in_source": [list(k) for k in launched],
        "not_captured": [list(k) for k in launched if k not in captured],
        "configs": list(configs.values()),
    }))


def launched_kernels(package_dir: Path | None = None) -> list[tuple[str, str]]:
    """(module, name) of every ``kernel[grid](...)`` launch written in the kernel sources (by AST).

    What the scenarios must cover: a kernel launched in the sources but never captured would be
    compiled by nobody here.
    """
    import ast

    if package_dir is None:
        spec = importlib.util.find_spec("rlloss.kernels")
        package_dir = Path(next(iter(spec.submodule_search_locations)))
    found = set()
    for path in sorted(package_dir.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        # a kernel imported from a sibling module (``from .logits import _logits_bwd_kernel``) is that module's
        defined_in = {alias.asname or alias.name: f"rlloss.kernels.{node.module}" for node in ast.walk(tree)
                      if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module for alias in node.names}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                    and isinstance(node.func.value, ast.Name)):
                name = node.func.value.id
                found.add((defined_in.get(name, f"rlloss.kernels.{path.stem}"), name))
    return sorted(found)


def label(config: dict[str, Any]) -> str:
    """A short description: non-fp32 pointer dtypes, constexprs, integers that lost divisibility."""
    sig = config["signature"]
    names = list(sig)
    by_dtype: dict[str, list[str]] = {}
    for name, ty in sig.items():
        if ty.startswith("*") and ty != "*fp32":
            by_dtype.setdefault(ty[1:], []).append(name.removesuffix("_ptr"))
    parts = [f"{dt}:{','.join(ns)}" for dt, ns in by_dtype.items()]
    for path, value in config["constexprs"]:
        name = names[path[0]]
        if value == 1 and not isinstance(value, bool) and re.match(r"(s_|stride)", name):
            continue  # a unit stride: contiguous, the expected case
        if isinstance(value, bool):
            if value:
                parts.append(name)
        elif value is None:
            continue
        elif isinstance(value, dict):
            parts.append(f"{name}={value['tl_dtype']}")
        else:
            parts.append(f"{name}={value}")
    divisible = {names[p[0]] for p, _ in config["attrs"]}
    nodiv = [n for n, ty in sig.items() if ty in ("i32", "i64") and n not in divisible]
    if nodiv:
        parts.append("no-div16:" + ",".join(nodiv))
    undiv_ptrs = [n for n, ty in sig.items() if ty.startswith("*") and n not in divisible]
    if undiv_ptrs:
        parts.append("unaligned:" + ",".join(undiv_ptrs))
    if config["options"].get("num_warps", 4) != 4:
        parts.append(f"w{config['options']['num_warps']}")
    return " ".join(parts) or "-"
