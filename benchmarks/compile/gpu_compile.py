"""Compile every Triton kernel of rlloss for sm_80 and sm_90a on the CPU and read the machine code.

Nothing here runs on a GPU: the kernels are compiled for named GPU targets by Triton's own
compiler (``triton.compile`` with ``GPUTarget("cuda", 80 | 90, 32)``; Triton's NVIDIA backend
turns capability 90 into ``sm_90a``), and the cubins are read with the ``cuobjdump`` and
``nvdisasm`` shipped in the triton wheel. For each kernel configuration the dispatcher really
launches it reports:

* registers per thread, local memory (spills: the stack frame and local arrays, and any
  ``LDL``/``STL`` in the SASS) and shared memory (``cuobjdump --dump-resource-usage``; shared =
  static, which ptxas sets to 1 KiB on sm_90a, + the dynamic shared memory Triton launches with);
* theoretical occupancy (``gpu_sass.occupancy``);
* the global loads and stores of the SASS by width (``LDG``/``STG``: 128, 64, 32, 16, 8 bits),
  and every atomic or reduction-to-memory instruction (``ATOM*``, ``RED*`` in the SASS, ``atom``,
  ``red`` in the PTX): there must be none, that is the determinism promise, checked in the
  machine code.

The parts, one job each: ``gpu_scenarios.py`` (the public calls whose launches are compiled),
``gpu_capture.py`` (capturing those launches under the interpreter, specialised as on a GPU),
``gpu_build.py`` (compiling them, and the probes that must trip the checks), ``gpu_sass.py``
(reading the machine code), ``gpu_loads.py`` (the 128-bit loads each configuration must take).
This module runs them, capture and compile each in a child process (Triton chooses the
interpreter when it is first imported), and reports.

Usage::

    python benchmarks/compile/gpu_compile.py                # table + benchmarks/results/gpu-compile.json
    python benchmarks/compile/gpu_compile.py --out r.json   # elsewhere
    python benchmarks/compile/gpu_compile.py --jobs 4       # compile processes (default: CPU count)

The token-streaming kernels (``_policy_loss_fwd_kernel``, ``_row_log_ratio_kernel``,
``_masked_sum_kernel``) also promise 128-bit loads: ``gpu_loads.expected_vector_loads`` works out,
from each configuration's constexpr switches and specialisation, which per-token float inputs it
reads and how many ``LDG.128`` per thread each must take (contiguous, 16-byte aligned, row stride
and length divisible by 16, and at least 4 fp32 or 8 bf16/fp16 elements per thread).

The exit status is 1 when a scenario fails, a launched kernel is not covered, or a configuration
fails to compile, spills, contains an atomic or takes fewer 128-bit loads than expected.
``tests/test_gpu_compile.py`` asserts the same promises in CI (cold, about a minute on 2 cores;
Triton's cache makes reruns faster).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its siblings in benchmarks/compile/

# Standard library only below these: the compile child forks its pool after importing this module.
from gpu_build import compile_child, quiet_triton_warnings  # noqa: E402
from gpu_capture import capture_child, label  # noqa: E402
from gpu_loads import TOKEN_INPUTS, expected_vector_loads, is_aligned  # noqa: E402
from gpu_sass import ARCHS, GPU_LIMITS  # noqa: E402

REPO = Path(__file__).resolve().parents[2]  # benchmarks/compile/ -> the checkout root
DEFAULT_OUT = REPO / "benchmarks" / "results" / "gpu-compile.json"

# --- orchestration ---------------------------------------------------------------------------------

def _child_env(interpret: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _run_child(args: list[str], interpret: bool, timeout: float) -> None:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], env=_child_env(interpret),
                          capture_output=True, text=True, timeout=timeout, cwd=str(REPO))
    if proc.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n"
                           f"{proc.stderr[-8000:]}")


def capture_configs(*, execute: bool = False, timeout: float = 600) -> dict[str, Any]:
    """The distinct kernel launches of every scenario, specialised as on a GPU (child process).

    ``execute`` also runs each kernel in the interpreter (slower; outputs are otherwise left
    uninitialised, which the dispatch, a function of shapes and options only, never reads).
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "capture.json")
        _run_child(["--_capture", out] + (["--_execute"] if execute else []), interpret=True, timeout=timeout)
        captured = json.loads(Path(out).read_text())
    captured["configs"].sort(key=lambda c: (c["module"], c["kernel"], label(c)))
    for i, config in enumerate(captured["configs"]):
        config["id"] = i
        config["label"] = label(config)
        if config["kernel"] in TOKEN_INPUTS:
            config["expected_ldg128"] = expected_vector_loads(config)
    return captured


def compile_configs(configs: list[dict[str, Any]], archs: tuple[str, ...] = tuple(ARCHS), *, jobs: int | None = None,
                    timeout: float = 1200) -> list[dict[str, Any]]:
    """Compile each configuration for each arch in a child process without the interpreter."""
    jobs = jobs or os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "configs.json"), os.path.join(tmp, "rows.json")
        Path(src).write_text(json.dumps({"configs": configs, "archs": list(archs)}))
        _run_child(["--_compile", src, out, "--jobs", str(jobs)], interpret=False, timeout=timeout)
        rows = json.loads(Path(out).read_text())
    rows.sort(key=lambda r: (r["id"], r["arch"]))
    return rows


def collect(archs: tuple[str, ...] = tuple(ARCHS), *, jobs: int | None = None, execute: bool = False) -> dict[str, Any]:
    """Capture the dispatched configurations and compile them: everything the table and JSON hold."""
    t0 = time.perf_counter()
    captured = capture_configs(execute=execute)
    t1 = time.perf_counter()
    rows = compile_configs(captured["configs"], archs, jobs=jobs)
    t2 = time.perf_counter()
    return {
        "triton": captured["triton"],
        "archs": list(archs),
        "scenarios": captured["scenarios"],
        "capture_failures": captured["failures"],
        "launched_in_source": captured["launched_in_source"],
        "not_captured": captured["not_captured"],
        "configs": captured["configs"],
        "rows": rows,
        "timing_s": {"capture": round(t1 - t0, 1), "compile": round(t2 - t1, 1), "total": round(t2 - t0, 1)},
    }


# --- report ----------------------------------------------------------------------------------------

def _widths(counts: dict[str, int]) -> str:
    return " ".join(f"{w}x{n}" for w, n in counts.items()) or "-"


HEADER = ("id", "kernel", "arch", "regs", "spill B", "smem B", "occupancy", "LDG bits x count", "STG bits x count",
          "atomics", "config")


def table_rows(rows: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    out = []
    for r in rows:
        if not r["ok"]:
            out.append((str(r["id"]), r["kernel"], r["arch"], "FAILED", "", "", "", "", "", "", r["config"]))
            continue
        occ = f"{r['occupancy']:.0%} ({r['limited_by']})"
        atomics = ",".join(f"{k}x{v}" for k, v in r["atomics"].items()) or "none"
        out.append((str(r["id"]), r["kernel"], r["arch"], str(r["regs"]), str(r["local_bytes"]), str(r["shared_bytes"]),
                    occ, _widths(r["ldg"]), _widths(r["stg"]), atomics, r["config"]))
    return out


def format_table(result: dict[str, Any]) -> str:
    body = table_rows(result["rows"])
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(HEADER)]
    lines = [
        f"rlloss Triton kernels compiled for GPU targets on the CPU, not run (triton {result['triton']}, "
        f"{len(result['configs'])} dispatched configurations x {', '.join(result['archs'])})",
        "regs per thread; spill B = local memory bytes per thread; smem B = shared memory per block "
        "(incl. dynamic); occupancy = resident warps / 64 (limiter)",
        "  ".join(h.ljust(w) for h, w in zip(HEADER, widths)),
        "  ".join("-" * w for w in widths),
    ]
    for row in body:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def summary(result: dict[str, Any]) -> list[str]:
    """One line per broken promise (capture or compile failures, uncovered kernels, spills, atomics,
    token-streaming configurations with fewer 128-bit loads than ``expected_vector_loads``), and the
    other kernels with no 128-bit global load on contiguous, aligned inputs."""
    notes = []
    for f in result["capture_failures"]:
        notes.append(f"CAPTURE FAILED {f['scenario']}: {f['error']}")
    for module, kernel in result["not_captured"]:
        notes.append(f"NOT COVERED {module}.{kernel}: launched in the sources, by no scenario")
    for r in result["rows"]:
        where = f"[{r['id']}] {r['kernel']} {r['arch']} ({r['config']})"
        if not r["ok"]:
            notes.append(f"COMPILE FAILED {where}: {r['error'].splitlines()[0]}")
            continue
        if r["spills"]:
            notes.append(f"SPILLS {where}: {r['local_bytes']} B local memory, {r['local_accesses']} LDL/STL")
        if r["atomics"] or r["ptx_atomics"]:
            notes.append(f"ATOMICS {where}: {r['atomics']} {r['ptx_atomics']}")
    configs = {c["id"]: c for c in result["configs"]}
    for r in result["rows"]:
        want = sum(expected_vector_loads(configs[r["id"]]).values()) if r["ok"] else 0
        if want and r["ldg"].get("128", 0) < want:
            notes.append(f"FEWER 128-BIT LOADS [{r['id']}] {r['kernel']} {r['arch']} ({r['config']}): "
                         f"{r['ldg'].get('128', 0)} LDG.128, expected at least {want} for "
                         f"{expected_vector_loads(configs[r['id']])}; LDG {r['ldg']}")
    # the other kernels: a heuristic note, any 128-bit load on contiguous, aligned inputs
    aligned = {c["id"] for c in result["configs"] if is_aligned(c) and c["kernel"] not in TOKEN_INPUTS}
    by_kernel: dict[str, list[bool]] = {}
    for r in result["rows"]:
        if r["ok"] and r["id"] in aligned and r["ldg"]:
            by_kernel.setdefault(r["kernel"], []).append("128" in r["ldg"])
    for kernel, has in sorted(by_kernel.items()):
        if not all(has):
            widest = sorted({max(map(int, r["ldg"])) for r in result["rows"]
                             if r["ok"] and r["kernel"] == kernel and r["id"] in aligned and r["ldg"]})
            notes.append(f"no 128-bit global load: {kernel} in {has.count(False)} of {len(has)} aligned "
                         f"(config, arch) pairs; widest loads there: {', '.join(map(str, widest))} bits")
    return notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPU count)")
    parser.add_argument("--execute", action="store_true", help="also run each captured kernel in the interpreter")
    parser.add_argument("--_capture", help=argparse.SUPPRESS)
    parser.add_argument("--_execute", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_compile", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._capture:
        quiet_triton_warnings()
        capture_child(args._capture, args._execute)
        return 0
    if args._compile:
        compile_child(*args._compile, jobs=args.jobs or 1)
        return 0

    cache_dir = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    cache_entries = sum(1 for _ in cache_dir.iterdir()) if cache_dir.is_dir() else 0
    result = collect(jobs=args.jobs, execute=args.execute)
    print(format_table(result))
    print()
    notes = summary(result)
    print("\n".join(notes) if notes else "all compiled; no spills, no atomics")
    t = result["timing_s"]
    print(f"\ncapture {t['capture']} s, compile {t['compile']} s, total {t['total']} s "
          f"({os.cpu_count()} CPUs; Triton cache {cache_dir} held {cache_entries} entries before: "
          f"{'warm' if cache_entries else 'cold'})")
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "note": "compiled for GPU targets on the CPU, not run",
        "triton": result["triton"],
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "triton_cache": {"dir": str(cache_dir), "entries_before": cache_entries},
        "occupancy_formula": ("blocks = min(32, 64 // W, (65536 // (ceil(32*R/256)*256)) // W, "
                              "smem_SM // (ceil(S/128)*128 + 1024)); occupancy = blocks*W/64; "
                              "smem_SM = 164 KiB (sm_80), 228 KiB (sm_90a)"),
        "gpu_limits": {arch: GPU_LIMITS[cap] for arch, cap in ARCHS.items()},
        **{k: result[k] for k in ("archs", "timing_s", "scenarios", "capture_failures", "launched_in_source",
                                  "not_captured", "configs", "rows")},
        "notes": notes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")
    failed = (bool(result["capture_failures"]) or bool(result["not_captured"])
              or any(not r["ok"] or r["spills"] or r["atomics"] for r in result["rows"])
              or any(n.startswith("FEWER 128-BIT LOADS") for n in notes))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
