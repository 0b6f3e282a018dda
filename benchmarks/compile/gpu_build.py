"""Compiling kernel configurations for GPU targets on the CPU, and the probes that must trip the checks.

``compile_child`` runs in a child process without the interpreter (Triton chooses it when first
imported): ``triton.compile`` with ``GPUTarget("cuda", 80 | 90, 32)`` for each captured
configuration and arch, in a pool of processes, then ``gpu_sass.finish_rows`` reads the machine
code. Standard library only at import time: the pool forks after it.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from gpu_capture import decode_constexpr
from gpu_sass import ARCHS, PTX_ATOMIC, elf_text, finish_rows, nvidia_tool, occupancy, parse_resource_usage


def quiet_triton_warnings() -> None:
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")


# Probes: kernels that must trip the checks (an atomic; spills), so a test can show the readers of
# the machine code see what they look for. They are defined here, independent of rlloss's kernels,
# so a change to the library cannot quietly disarm them. Triton needs a kernel's source in a file,
# hence a module written to a temporary directory in the compile process.
PROBE_MODULE = "rlloss_gpu_compile_probes"
PROBE_SOURCE = """
import triton
import triton.language as tl


@triton.jit
def atomic_add_probe(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.atomic_add(out_ptr, tl.sum(x, axis=0))


@triton.jit
def spill_probe(x_ptr, out_ptr, n_iter, BLOCK: tl.constexpr):
    # x and acc are both live across a loop of unknown length: 2 * BLOCK / (32 * num_warps)
    # independent fp32 values per thread, which no register allocator can fold away
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    acc = x
    for _ in range(n_iter):
        acc = acc * x + 1.0
    tl.store(out_ptr + offs, acc)
"""

# spill_probe with one warp and a 4096 block: 2 * 4096 / 32 = 256 live values per thread, more than
# the 255 registers a thread can have, so it spills even uncapped; capped at 64 it spills over 1 KiB.
SPILL_PROBE_BLOCK = 4096
SPILL_PROBE_MAXNREG = 64


def atomic_probe_config() -> dict[str, Any]:
    """A configuration of ``atomic_add_probe``, as ``capture_configs`` returns them."""
    return {"id": -1, "module": PROBE_MODULE, "kernel": "atomic_add_probe", "label": "probe: tl.atomic_add",
            "signature": {"x_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"},
            "constexprs": [[[3], 1024]], "attrs": [[[0], [["tt.divisibility", 16]]], [[1], [["tt.divisibility", 16]]]],
            "options": {"num_warps": 4}}


def spill_probe_config(maxnreg: int | None = None) -> dict[str, Any]:
    """A configuration of ``spill_probe`` (256 live fp32 values per thread), optionally under a
    ``maxnreg`` register cap; id -2 uncapped, -3 capped. Both must show as spills."""
    options: dict[str, Any] = {"num_warps": 1}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    return {"id": -2 if maxnreg is None else -3, "module": PROBE_MODULE, "kernel": "spill_probe",
            "label": "probe: spill_probe" + ("" if maxnreg is None else f" maxnreg={maxnreg}"),
            "signature": {"x_ptr": "*fp32", "out_ptr": "*fp32", "n_iter": "i32", "BLOCK": "constexpr"},
            "constexprs": [[[3], SPILL_PROBE_BLOCK]],
            "attrs": [[[0], [["tt.divisibility", 16]]], [[1], [["tt.divisibility", 16]]]],
            "options": options}


def probe_configs() -> list[dict[str, Any]]:
    """Every probe: the atomic, the spill probe uncapped and capped at ``SPILL_PROBE_MAXNREG``."""
    return [atomic_probe_config(), spill_probe_config(), spill_probe_config(SPILL_PROBE_MAXNREG)]


def _import_kernel_module(name: str):
    if name != PROBE_MODULE:
        return importlib.import_module(name)
    if name not in sys.modules:
        folder = tempfile.mkdtemp(prefix="rlloss-probe-")
        path = os.path.join(folder, f"{name}.py")
        Path(path).write_text(PROBE_SOURCE)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def compile_one(task: tuple[dict[str, Any], str]) -> tuple[dict[str, Any], bytes | None]:
    """Compile one configuration for one arch: the row (resources) and the kernel's machine code.

    Never raises: a failure is a row with ``ok=False`` and the error.
    """
    config, arch = task
    quiet_triton_warnings()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    capability = ARCHS[arch]
    row: dict[str, Any] = {"id": config["id"], "kernel": config["kernel"], "module": config["module"],
                           "config": config["label"], "arch": arch, "ok": False}
    t0 = time.perf_counter()
    try:
        fn = getattr(_import_kernel_module(config["module"]), config["kernel"])
        if not isinstance(fn, JITFunction):
            raise TypeError(f"{config['module']}.{config['kernel']} is {type(fn).__name__}, not a JITFunction "
                            "(is TRITON_INTERPRET set in the compile process?)")
        src = ASTSource(fn, config["signature"], {tuple(p): decode_constexpr(v) for p, v in config["constexprs"]},
                        {tuple(p): a for p, a in config["attrs"]})
        kernel = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=dict(config["options"]))
        cubin = kernel.asm["cubin"]
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"{config['kernel']}.cubin")
            Path(path).write_bytes(cubin)
            usage = subprocess.run([nvidia_tool("cuobjdump"), "--dump-elf", "--dump-resource-usage", path],
                                   capture_output=True, text=True, check=True).stdout
        resources = parse_resource_usage(usage)
        ptx_target = re.search(r"^\.target\s+(\w+)", kernel.asm["ptx"], re.MULTILINE)
        num_warps = kernel.metadata.num_warps
        # static (what ptxas allocates, 1 KiB on sm_90a) + dynamic (Triton's scratch, given at launch)
        shared = resources["static_shared"] + kernel.metadata.shared
        row.update(
            ok=True,
            elf_arch=resources["elf_arch"],
            ptx_target=ptx_target.group(1) if ptx_target else None,
            num_warps=num_warps,
            regs=resources["regs"],
            # ptxas puts spilled registers in the stack frame, local arrays in LOCAL: both are local memory
            local_bytes=resources["stack"] + resources["local"],
            stack_bytes=resources["stack"],
            shared_bytes=shared,
            **occupancy(resources["regs"], shared, num_warps, capability),
            ptx_atomics=sorted({m.group(1) for m in PTX_ATOMIC.finditer(kernel.asm["ptx"])}),
            enable_fp_fusion=kernel.metadata.enable_fp_fusion,
        )
        text = elf_text(cubin)
    except Exception as exc:
        row.update(error=f"{type(exc).__name__}: {exc}"[:4000])
        text = None
    row["compile_s"] = round(time.perf_counter() - t0, 3)
    return row, text


def compile_child(in_path: str, out_path: str, jobs: int) -> None:
    """Compile every (config, arch) task of ``in_path`` with ``jobs`` processes; rows to ``out_path``."""
    payload = json.loads(Path(in_path).read_text())
    tasks = [(c, arch) for c in payload["configs"] for arch in payload["archs"]]
    # the big kernels first, so the processes finish together
    tasks.sort(key=lambda t: -len(t[0]["signature"]))
    if jobs <= 1 or len(tasks) <= 1:
        results = [compile_one(t) for t in tasks]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # fork: this process has imported nothing but the standard library so far
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context(method)) as pool:
            results = list(pool.map(compile_one, tasks, chunksize=1))
    Path(out_path).write_text(json.dumps(finish_rows(results)))
