"""Every Triton kernel compiles for sm_80 and sm_90a, in the configurations the dispatcher launches,
with no spills and no atomics: checked in the machine code, on the CPU, without a GPU.

``benchmarks/compile/gpu_compile.py`` captures the launches of the public functions (``gpu_capture.py``, in a
child process under Triton's interpreter), compiles each distinct specialisation for both targets
(``gpu_build.py``, in another child process, without it) and reads the cubins (``gpu_sass.py``).
This module runs that once and asserts:

* every scenario ran and every kernel launched in the sources was captured;
* every configuration compiled for both targets, and the cubin is for the target asked;
* no local memory (no spills) and no atomic or reduction-to-memory instruction (``ATOM*``,
  ``RED*`` in SASS; ``atom``/``red`` in PTX): the determinism promise, in the machine code;
* the readers of the machine code see what they look for: an atomic in a probe kernel, spills
  in a register-hungry probe kernel (256 live values per thread), uncapped and under a register
  cap; the probes live in ``gpu_build.py``, independent of the library's kernels;
* 128-bit global loads where the elementwise kernels read contiguous fp32 inputs, and in every
  configuration of the token-streaming kernels (policy-loss forward, GSPO row ratio, masked sum),
  as many ``LDG.128`` as ``gpu_loads.expected_vector_loads`` works out for the per-token float
  inputs it really reads.

triton is a dev dependency: without it this module fails, it does not skip.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

try:
    import triton  # noqa: F401
except ImportError as exc:  # a failure, not a skip: CI must compile the kernels
    raise ImportError(
        "tests/test_gpu_compile.py compiles the Triton kernels for sm_80/sm_90a on the CPU and needs triton, "
        "a dev dependency: pip install -e '.[dev]'"
    ) from exc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks" / "compile"))

import gpu_build  # noqa: E402
import gpu_compile  # noqa: E402
import gpu_loads  # noqa: E402

ARCHS = ("sm_80", "sm_90a")


@pytest.fixture(scope="module")
def result() -> dict:
    captured = gpu_compile.capture_configs()
    assert not captured["failures"], f"scenarios failed under the interpreter: {captured['failures']}"
    probes = gpu_build.probe_configs()
    rows = gpu_compile.compile_configs(captured["configs"] + probes, ARCHS)
    ids = {c["id"] for c in captured["configs"]}
    return {**captured, "rows": [r for r in rows if r["id"] in ids], "probes": [r for r in rows if r["id"] < 0]}


def _where(row: dict) -> str:
    return f"[{row['id']}] {row['module']}.{row['kernel']} for {row['arch']} ({row['config']})"


def test_every_launched_kernel_is_captured(result):
    launched = {tuple(k) for k in result["launched_in_source"]}
    assert len(launched) >= 10, f"found only {sorted(launched)} in the kernel sources"
    assert not result["not_captured"], (
        "kernels launched in the sources but by no scenario of benchmarks/compile/gpu_scenarios.py: "
        f"{result['not_captured']}"
    )


def test_every_config_compiles_for_both_targets(result):
    rows = result["rows"]
    assert len(rows) == len(ARCHS) * len(result["configs"])
    failed = [f"{_where(r)}: {r['error']}" for r in rows if not r["ok"]]
    assert not failed, "\n\n".join(failed)
    for r in rows:
        assert r["elf_arch"] == r["arch"], f"{_where(r)}: the cubin is for {r['elf_arch']}"
        assert r["ptx_target"] == r["arch"], f"{_where(r)}: the PTX targets {r['ptx_target']}"
        assert r["instructions"] > 0, f"{_where(r)}: empty SASS listing"


def test_no_spills(result):
    spilled = [f"{_where(r)}: {r['regs']} registers, {r['local_bytes']} B local memory, "
               f"{r['local_accesses']} LDL/STL" for r in result["rows"] if r["ok"] and r["spills"]]
    assert not spilled, "\n".join(spilled)


def test_no_atomics(result):
    atomic = [f"{_where(r)}: SASS {r['atomics']}, PTX {r['ptx_atomics']}" for r in result["rows"]
              if r["ok"] and (r["atomics"] or r["ptx_atomics"])]
    assert not atomic, "\n".join(atomic)


def test_the_checks_see_atomics_and_spills(result):
    """The probes: otherwise a broken reader of the machine code would pass the two tests above."""
    probes = {(r["config"], r["arch"]): r for r in result["probes"]}
    cap = gpu_build.SPILL_PROBE_MAXNREG
    assert len(probes) == len(gpu_build.probe_configs()) * len(ARCHS)
    for arch in ARCHS:
        atomic = probes[("probe: tl.atomic_add", arch)]
        assert atomic["ok"], atomic.get("error")
        assert any(op.startswith(("ATOM", "RED")) for op in atomic["atomics"]), atomic["atomics"]
        assert atomic["ptx_atomics"], "no atom/red in the PTX of the atomic probe"
        for label, limit in (("probe: spill_probe", 255), (f"probe: spill_probe maxnreg={cap}", cap)):
            spill = probes[(label, arch)]
            assert spill["ok"], spill.get("error")
            assert spill["regs"] <= limit and spill["spills"] and spill["local_bytes"] > 0, (
                f"{arch} {label}: 256 live values per thread did not show as spills: regs {spill['regs']}, "
                f"{spill['local_bytes']} B local, {spill['local_accesses']} LDL/STL"
            )
            assert spill["local_accesses"] > 0, f"{arch} {label}: local memory but no LDL/STL in the SASS"


def _contiguous_fp32(result, kernel: str) -> list[dict]:
    """Rows of ``kernel`` whose configuration reads contiguous, aligned fp32 token data."""
    configs = {c["id"]: c for c in result["configs"]}
    rows = [r for r in result["rows"] if r["kernel"] == kernel and r["ok"]]
    picked = [r for r in rows if gpu_loads.is_aligned(configs[r["id"]])
              and next(iter(configs[r["id"]]["signature"].values())) == "*fp32"]
    assert picked, f"no contiguous fp32 configuration of {kernel} was captured"
    return picked


@pytest.mark.parametrize("kernel", ["_scale_grad_kernel", "_kl_kernel", "_mul_kernel"])
def test_elementwise_kernels_use_128_bit_loads(result, kernel):
    scalar = [_where(r) + f": LDG {r['ldg']}" for r in _contiguous_fp32(result, kernel) if "128" not in r["ldg"]]
    assert not scalar, "\n".join(scalar)


def test_token_read_model():
    """``expected_vector_loads`` on hand-written configurations of the forward kernel: GSPO without
    ref_logp reads no token data (the mask and the row stats only), with ref_logp it reads logp and
    ref_logp; a bf16 input of 8 elements per thread is one LDG.128, fp32 two; a ragged row none."""
    sig = {n: "i32" for n in ("T", "C", "n_chunks_total", "s_lp_b", "s_lp_t", "s_old_b", "s_old_t", "s_adv_b",
                              "s_adv_t", "s_m_b", "s_m_t", "s_ref_b", "s_ref_t", "s_w_b", "s_w_t")}
    ptrs = {"logp_ptr": "*bf16", "old_ptr": "*bf16", "adv_ptr": "*fp32", "mask_ptr": "*u8", "ref_ptr": "*bf16",
            "w_ptr": "*bf16", "stats_ptr": "*fp32", "grad_ptr": "*bf16", "part_ptr": "*fp32", "tok_loss_ptr": "*fp32"}
    flags = ("DUAL_CLIP", "DELTA", "CLAMP_LOW", "CLAMP_HIGH", "HAS_OLD", "ADV_PER_TOKEN", "HAS_REF", "ADD_KL", "KL_BIAS", "WRITE_GRAD",
             "WRITE_PARTIALS", "WRITE_TOKEN_LOSS")
    switches = ("OBJ", "ROW_STAT", "WEIGHTS", "KL_KIND")
    signature = {**ptrs, **sig, **{n: "fp32" for n in ("p0", "p1", "p2", "p3", "max_log_ratio", "beta", "kl_clamp")},
                 **{n: "constexpr" for n in (*switches, *flags, "BLOCK_T", "BLOCK_C")}}
    names = list(signature)

    def config(on, t_divisible=True, **kw):
        consts = {**{f: f in on for f in flags}, "OBJ": 0, "ROW_STAT": 1 if "SEQ_LEVEL" in on else 0, "WEIGHTS": 0,
                  "KL_KIND": 3, "BLOCK_T": 1024, "BLOCK_C": 4, "s_lp_t": 1, "s_old_t": 1, "s_adv_t": 1, "s_m_t": 1,
                  "s_ref_t": 1}
        # a ragged row length: T and the row strides lose their divisibility, the pointers keep it
        div = [*ptrs, *(("s_lp_b", "s_old_b", "s_adv_b", "s_m_b", "s_ref_b", "T") if t_divisible else ())]
        return {"kernel": "_policy_loss_fwd_kernel", "signature": {**signature, **kw}, "options": {"num_warps": 4},
                "constexprs": [[[names.index(n)], v] for n, v in consts.items()],
                "attrs": [[[names.index(n)], [["tt.divisibility", 16]]] for n in div]}

    grpo = ("HAS_OLD", "HAS_REF", "ADD_KL", "WRITE_GRAD", "WRITE_PARTIALS")
    assert gpu_loads.expected_vector_loads(config(grpo)) == {"logp_ptr": 1, "old_ptr": 1, "ref_ptr": 1}
    assert gpu_loads.expected_vector_loads(config(grpo, logp_ptr="*fp32"))["logp_ptr"] == 2
    assert gpu_loads.expected_vector_loads(config(("HAS_OLD", "SEQ_LEVEL", "WRITE_GRAD", "WRITE_PARTIALS"))) == {}
    assert gpu_loads.expected_vector_loads(config(("HAS_OLD", "SEQ_LEVEL", "HAS_REF", "WRITE_PARTIALS"))) == {
        "logp_ptr": 1, "ref_ptr": 1}
    assert gpu_loads.expected_vector_loads(config(("HAS_OLD", "ADV_PER_TOKEN", "SEQ_LEVEL", "WRITE_GRAD"))) == {
        "adv_ptr": 2}
    assert set(gpu_loads.expected_vector_loads(config(grpo, t_divisible=False)).values()) == {0}


TOKEN_KERNELS = ["_policy_loss_fwd_kernel", "_row_log_ratio_kernel", "_masked_sum_kernel"]


@pytest.mark.parametrize("kernel", TOKEN_KERNELS)
def test_token_kernels_use_128_bit_loads(result, kernel):
    """Every configuration that reads contiguous, aligned per-token float data takes at least the
    ``LDG.128`` of ``gpu_loads.expected_vector_loads``: 2 per fp32 input and 1 per bf16/fp16 input
    at 8 elements per thread (1 per fp32 input at 4). Configurations reading no token data (GSPO
    without ref_logp reads only the mask and the row stats) or none that can be proved aligned
    (ragged rows) expect none."""
    configs = {c["id"]: c for c in result["configs"] if c["kernel"] == kernel}
    expected = {i: gpu_loads.expected_vector_loads(c) for i, c in configs.items()}
    checked = [r for r in result["rows"] if r["id"] in configs and r["ok"] and sum(expected[r["id"]].values())]
    # the covering set must exercise the promise: fp32 configurations, and 16-bit ones for the 1024 blocks
    dtypes = {configs[r["id"]]["signature"][p] for r in checked for p, n in expected[r["id"]].items() if n}
    assert "*fp32" in dtypes and dtypes & {"*bf16", "*fp16"}, f"{kernel}: vectorisable inputs seen: {dtypes}"
    short = [f"{_where(r)}: {r['ldg'].get('128', 0)} LDG.128, expected at least {sum(expected[r['id']].values())} "
             f"for {expected[r['id']]}; LDG {r['ldg']}"
             for r in checked if r["ldg"].get("128", 0) < sum(expected[r["id"]].values())]
    assert not short, "\n".join(short)


def test_aliased_gradient_stores_wait_for_every_warps_loads(result):
    """From hidden states, a 16-bit head's ``d logits`` is written into the first half of each fp32 row of
    the logits tile that the same program reads: warps must not store over columns another warp has
    yet to load. ``ALIASED`` puts a barrier (``BAR``) in each block's loop: every aliased configuration
    has one, and where the same configuration is also compiled unaliased (an fp32 head, no bias: no
    layout conversion of a bias load either), that one has none, so the barrier is the flag's."""
    configs = {c["id"]: c for c in result["configs"]}
    rows = [r for r in result["rows"] if r["kernel"] == "_logits_bwd_kernel" and r["ok"]]

    def flags(row):
        names = list(configs[row["id"]]["signature"])
        return {names[i]: value for (i,), value in configs[row["id"]]["constexprs"]}

    with_alias = [r for r in rows if flags(r).get("ALIASED")]
    assert {r["arch"] for r in with_alias} == set(ARCHS), "no aliased configuration captured (bf16/fp16 heads)"
    assert all(r["barriers"] >= 1 for r in with_alias), [(_where(r), r["barriers"]) for r in with_alias]

    def twin(row):  # the configuration's flags without ALIASED, and the arch
        return row["arch"], tuple(sorted((k, v) for k, v in flags(row).items() if k != "ALIASED"))

    plain = {twin(r): r["barriers"] for r in rows if not flags(r).get("ALIASED") and not flags(r).get("HAS_BIAS")}
    pairs = [(r, plain[twin(r)]) for r in with_alias if not flags(r).get("HAS_BIAS") and twin(r) in plain]
    assert {r["arch"] for r, _ in pairs} == set(ARCHS), "no unaliased twin of an aliased configuration captured"
    assert all(barriers == 0 for _, barriers in pairs), [(_where(r), b) for r, b in pairs]
