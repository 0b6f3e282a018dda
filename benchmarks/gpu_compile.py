"""Compile every Triton kernel of rlloss for sm_80 and sm_90a on the CPU and read the machine code.

Nothing here runs on a GPU: the kernels are compiled for named GPU targets by Triton's own
compiler (``triton.compile`` with ``GPUTarget("cuda", 80 | 90, 32)``; Triton's NVIDIA backend
turns capability 90 into ``sm_90a``), and the cubins are read with the ``cuobjdump`` and
``nvdisasm`` shipped in the triton wheel. For each kernel configuration the dispatcher really
launches it reports:

* registers per thread, local memory (spills: the stack frame and local arrays, and any
  ``LDL``/``STL`` in the SASS) and shared memory (``cuobjdump --dump-resource-usage``; shared =
  static, which ptxas sets to 1 KiB on sm_90a, + the dynamic shared memory Triton launches with);
* theoretical occupancy (below);
* the global loads and stores of the SASS by width (``LDG``/``STG``: 128, 64, 32, 16, 8 bits),
  and every atomic or reduction-to-memory instruction (``ATOM*``, ``RED*`` in the SASS, ``atom``,
  ``red`` in the PTX): there must be none, that is the determinism promise, checked in the
  machine code.

Configurations. They are captured, not listed by hand: a child process with ``TRITON_INTERPRET=1``
calls the public ``rlloss`` functions with ``backend="triton"`` on small CPU tensors (the
scenarios below: every recipe, each aggregation and option, fp32/bf16/fp16, forward and backward)
and intercepts every kernel launch. Each launch is specialised with Triton's own launch-time
binder (``triton.runtime.jit.create_function_from_signature`` with the CUDA backend), exactly as
``JITFunction.run`` does on a GPU: pointer and integer types, ``tt.divisibility=16`` for pointers
aligned to 16 bytes and integers divisible by 16, integers equal to 1 turned into constants,
constexpr values and ``num_warps``. The shapes are typical of RL fine-tuning (``B`` rows of
``T = 4096`` tokens, a multiple of 16), plus a short row (``T = 512``), longer ones (``T`` up to
32768: 2 to 32 chunks of 1024 tokens per row, each a different combine tile) and a ragged length (``T = 1000``, not a multiple of 16: row strides lose their divisibility, so
no vector access can be proved aligned there). The kernels are then compiled in another child
process without the interpreter (Triton chooses the interpreter when it is first imported).

Theoretical occupancy, per SM, for a block of ``W = num_warps`` warps using ``R`` registers per
thread and ``S`` bytes of shared memory (the CUDA occupancy calculator's rules for sm_80/sm_90)::

    blocks = min(32,                                   # resident blocks per SM
                 64 // W,                              # 64 warps (2048 threads) per SM
                 (65536 // (ceil(32 R / 256) * 256)) // W,   # registers, 256-register units per warp
                 smem_SM // (ceil(S / 128) * 128 + 1024))    # shared memory, 1 KiB reserved per block
    occupancy = blocks * W / 64

with ``smem_SM`` = 164 KiB on sm_80 (A100) and 228 KiB on sm_90 (H100).

Usage::

    python benchmarks/gpu_compile.py                        # table + benchmarks/results/gpu-compile.json
    python benchmarks/gpu_compile.py --out r.json           # elsewhere
    python benchmarks/gpu_compile.py --jobs 4               # compile processes (default: CPU count)

The token-streaming kernels (``_policy_loss_fwd_kernel``, ``_row_log_ratio_kernel``,
``_masked_sum_kernel``) also promise 128-bit loads: ``expected_vector_loads`` works out, from each
configuration's constexpr switches and specialisation, which per-token float inputs it reads and how
many ``LDG.128`` per thread each must take (contiguous, 16-byte aligned, row stride and length
divisible by 16, and at least 4 fp32 or 8 bf16/fp16 elements per thread).

The exit status is 1 when a scenario fails, a launched kernel is not covered, or a configuration
fails to compile, spills, contains an atomic or takes fewer 128-bit loads than expected.
``tests/test_gpu_compile.py`` imports this module and asserts the same promises in CI (cold, about
a minute on 2 cores; Triton's cache makes reruns faster).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "gpu-compile.json"

# name -> compute capability handed to GPUTarget (Triton's NVIDIA backend emits sm_90a for 90)
ARCHS: dict[str, int] = {"sm_80": 80, "sm_90a": 90}


# --- GPU limits and occupancy ----------------------------------------------------------------------

GPU_LIMITS: dict[int, dict[str, int]] = {
    # A100 (sm_80) and H100 (sm_90): CUDA C Programming Guide, "Compute Capabilities" table
    80: dict(regs_per_sm=65536, max_warps_per_sm=64, max_blocks_per_sm=32, smem_per_sm=164 * 1024,
             smem_per_block=163 * 1024, reserved_smem_per_block=1024, reg_unit_per_warp=256, smem_unit=128),
    90: dict(regs_per_sm=65536, max_warps_per_sm=64, max_blocks_per_sm=32, smem_per_sm=228 * 1024,
             smem_per_block=227 * 1024, reserved_smem_per_block=1024, reg_unit_per_warp=256, smem_unit=128),
}


def occupancy(regs: int, smem: int, num_warps: int, capability: int) -> dict[str, Any]:
    """Theoretical occupancy (see the module docstring): resident blocks, warps, fraction, limiter."""
    lim = GPU_LIMITS[capability]
    regs_per_warp = math.ceil(max(regs, 1) * 32 / lim["reg_unit_per_warp"]) * lim["reg_unit_per_warp"]
    smem_per_block = math.ceil(smem / lim["smem_unit"]) * lim["smem_unit"] + lim["reserved_smem_per_block"]
    limits = {
        "blocks": lim["max_blocks_per_sm"],
        "warps": lim["max_warps_per_sm"] // num_warps,
        "registers": (lim["regs_per_sm"] // regs_per_warp) // num_warps,
        "shared": lim["smem_per_sm"] // smem_per_block if smem <= lim["smem_per_block"] else 0,
    }
    blocks = min(limits.values())
    limiter = min(limits, key=lambda k: (limits[k], k != "warps"))  # a tie names the warp limit
    warps = blocks * num_warps
    return {"blocks_per_sm": blocks, "warps_per_sm": warps, "occupancy": warps / lim["max_warps_per_sm"],
            "limited_by": limiter}


# --- reading the machine code ----------------------------------------------------------------------

ATOMIC_OPCODE = re.compile(r"^(ATOM|ATOMG|ATOMS|RED|REDG|REDAS|REDS)$")  # not REDUX (a warp reduction into a register)
_SASS_LINE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")
_ADDRESS = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/")
_WIDTH_MODIFIERS = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}


def nvidia_tool(name: str) -> str:
    """Path of a CUDA binary tool shipped in the triton wheel (``cuobjdump``, ``nvdisasm``)."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found at {path} (it ships in the triton wheel)")
    return str(path)


def elf_text(cubin: bytes) -> bytes:
    """The machine code of the single kernel in a cubin: its ``.text.<name>`` section (ELF64)."""
    if cubin[:4] != b"\x7fELF" or cubin[4] != 2 or cubin[5] != 1:
        raise ValueError("not a little-endian ELF64 cubin")
    (shoff,) = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", cubin, shoff + i * shentsize) for i in range(shnum)]
    names_at = sections[shstrndx][4]

    def name(sec) -> str:
        start = names_at + sec[0]
        return cubin[start:cubin.index(b"\0", start)].decode()

    texts = [cubin[sec[4]:sec[4] + sec[5]] for sec in sections if name(sec).startswith(".text.")]
    if len(texts) != 1:
        raise ValueError(f"expected one .text section in the cubin, found {len(texts)}")
    return texts[0]


def disassemble(texts: list[bytes], capability: int) -> list[str]:
    """SASS listings of many kernels' machine code with one ``nvdisasm`` call.

    nvdisasm takes one file and most of its time is start-up, so the ``.text`` sections are
    concatenated into one raw binary (``nvdisasm -b SM80|SM90a``) and the listing is cut back at
    the section boundaries: every instruction is 16 bytes on sm_70 and later, at address
    ``/*offset*/``, and each piece must hold exactly ``len(text) // 16`` instructions.
    """
    blob = b"".join(texts)
    starts = [0]
    for text in texts:
        if len(text) % 16:
            raise ValueError("a .text section is not a whole number of 16-byte instructions")
        starts.append(starts[-1] + len(text))
    pieces: list[list[str]] = [[] for _ in texts]
    if blob:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "text.bin")
            Path(path).write_bytes(blob)
            sm = f"SM{capability}{'a' if capability >= 90 else ''}"
            listing = subprocess.run([nvidia_tool("nvdisasm"), "-b", sm, "-ndf", path], capture_output=True,
                                     text=True, check=True).stdout
        k = 0
        for line in listing.splitlines():
            m = _ADDRESS.search(line)
            if not m:
                continue
            address = int(m.group(1), 16)
            while address >= starts[k + 1]:
                k += 1
            pieces[k].append(line)
    for piece, text in zip(pieces, texts):
        if len(piece) != len(text) // 16:
            raise RuntimeError(f"nvdisasm listing split into {len(piece)} instructions, expected {len(text) // 16}")
    return ["\n".join(piece) for piece in pieces]


def access_width(opcode: str) -> int:
    """Bits moved per thread by an LDG/STG opcode such as ``LDG.E.128.CONSTANT``; plain is 32."""
    for mod in opcode.split(".")[1:]:
        if mod in _WIDTH_MODIFIERS:
            return _WIDTH_MODIFIERS[mod]
    return 32


def parse_sass(sass: str) -> dict[str, Any]:
    """Counts of global loads/stores by width, atomics and local-memory accesses in a SASS listing."""
    ldg: Counter[int] = Counter()
    stg: Counter[int] = Counter()
    atomics: Counter[str] = Counter()
    mma: Counter[str] = Counter()
    local = 0
    opcodes = 0
    for line in sass.splitlines():
        m = _SASS_LINE.search(line)
        if not m:
            continue
        opcodes += 1
        op = m.group(1)
        base = op.split(".")[0]
        if base == "LDG":
            ldg[access_width(op)] += 1
        elif base == "STG":
            stg[access_width(op)] += 1
        elif base in ("LDL", "STL"):
            local += 1
        if ATOMIC_OPCODE.match(base):
            atomics[op] += 1
        if base in ("HMMA", "HGMMA"):  # tensor-core matrix multiplies (sm_80 / sm_90a)
            mma[base] += 1
    return {
        "instructions": opcodes,
        "ldg": {str(w): n for w, n in sorted(ldg.items(), reverse=True)},
        "stg": {str(w): n for w, n in sorted(stg.items(), reverse=True)},
        "atomics": dict(atomics),
        "mma": dict(mma),
        "local_accesses": local,
    }


def parse_resource_usage(text: str) -> dict[str, Any]:
    """``REG``, ``STACK``, ``SHARED``, ``LOCAL`` of the (single) function in a cubin, and its ``sm``.

    ``text`` is the output of ``cuobjdump --dump-elf --dump-resource-usage``.
    """
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    if not m:
        raise ValueError(f"no resource usage in cuobjdump output:\n{text[:2000]}")
    regs, stack, shared, local = map(int, m.groups())
    sm = re.search(r"\bsm\s*=\s*(\w+)", text)
    return {"regs": regs, "stack": stack, "static_shared": shared, "local": local,
            "elf_arch": f"sm_{sm.group(1)}" if sm else None}


PTX_ATOMIC = re.compile(r"^\s*(?:@!?%p\d+\s+)?(atom|red|cp\.reduce\.async\.bulk)\.", re.MULTILINE)


# --- capture (child process, TRITON_INTERPRET=1) ---------------------------------------------------

# Shapes. B only enters the kernels as a scalar; T sets the block sizes and the row strides.
B = 8
T = 4096  # typical: a multiple of 16, several 1024-token chunks per row
SHORT_T = 512  # one chunk per row, a smaller block
RAGGED_T = 1000  # not a multiple of 16: the row stride loses its divisibility
CHUNKED_T = (2048, 8192, 16384, 32768)  # 2, 8, 16, 32 chunks per row (T itself gives 4)


def _policy_inputs(torch, dtype, b: int, t: int, *, per_token_adv=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=gen) * 3
    logp = (old + 0.05 * torch.randn(b, t, generator=gen)).to(dtype).requires_grad_(True)
    ref = (old + 0.05 * torch.randn(b, t, generator=gen)).to(dtype)
    lengths = torch.randint(t // 4, t + 1, (b,), generator=gen)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    adv = torch.randn((b, t) if per_token_adv else (b,), generator=gen)
    return logp, old.to(dtype), adv, mask, ref


def scenarios() -> list[tuple[str, Callable[[], None]]]:
    """(name, thunk) pairs calling the public API with ``backend="triton"``; run in the capture child.

    A covering set, not the full product of every option: each recipe and the all-options
    configurations (the most code, the most registers) in every dtype, then each remaining option
    once in fp32, then other row lengths. Every launch the dispatcher makes for these calls
    (forward and backward) is captured; distinct specialisations are compiled once.
    """
    import torch

    import rlloss

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    f32 = torch.float32
    out: list[tuple[str, Callable[[], None]]] = []

    def add(name: str, fn: Callable[[], None]) -> None:
        out.append((name, fn))

    # policy_loss: forward + backward (what a training step launches)
    def policy(dt, t=T, b=B, grad=True, per_token_adv=False, old=True, ref=False, **kw):
        def run():
            logp, old_logp, adv, mask, ref_logp = _policy_inputs(torch, dt, b, t, per_token_adv=per_token_adv)
            if not grad:
                logp = logp.detach()
            res = rlloss.policy_loss(logp, old_logp if old else None, adv, mask, ref_logp=ref_logp if ref else None,
                                     backend="triton", **kw)
            if grad:
                res.loss.backward()
        return run

    grpo = dict(ref=True, beta=0.04, aggregation="seq_mean_token_mean")
    gspo = dict(eps_low=3e-4, eps_high=4e-4, level="sequence", aggregation="seq_mean_token_mean")
    everything = dict(per_token_adv=True, ref=True, beta=0.04, dual_clip=3.0)
    for dn, dt in dtypes.items():
        add(f"policy_loss GRPO {dn}", policy(dt, **grpo))
        add(f"policy_loss DAPO {dn}", policy(dt, eps_high=0.28, aggregation="token_mean"))
        add(f"policy_loss GSPO {dn}", policy(dt, **gspo))
        add(f"policy_loss all options, token level {dn}", policy(dt, **everything, aggregation="seq_mean_token_sum"))
        add(f"policy_loss all options, sequence level {dn}", policy(dt, **everything, level="sequence"))
    add("policy_loss Dr.GRPO fp32", policy(f32, aggregation="constant", max_tokens=T))
    add("policy_loss old_logp=None fp32", policy(f32, old=False))
    add("policy_loss ref_logp with beta=0 fp32", policy(f32, ref=True, beta=0.0))
    add("policy_loss dual_clip fp32", policy(f32, dual_clip=3.0))
    add("policy_loss per-token adv fp32", policy(f32, per_token_adv=True))
    add("policy_loss num_tokens, num_seqs numbers fp32",
        policy(f32, aggregation="token_mean", num_tokens=50000.0, num_seqs=64.0))
    add("policy_loss num_tokens, num_seqs tensors fp32",
        policy(f32, aggregation="seq_mean_token_sum", num_tokens=torch.tensor(5e4), num_seqs=torch.tensor(64.0)))
    add("policy_loss forward only fp32", policy(f32, grad=False))
    for t in (SHORT_T, RAGGED_T):
        add(f"policy_loss GRPO fp32 T={t}", policy(f32, t=t, **grpo))
        add(f"policy_loss GSPO fp32 T={t}", policy(f32, t=t, **gspo))
    add(f"policy_loss DAPO bf16 T={RAGGED_T}", policy(torch.bfloat16, t=RAGGED_T, aggregation="token_mean"))
    # every chunk count up to 32 (C = ceil(T / 1024)): the combine's tile is BLOCK_R x next_pow2(C)
    for t in CHUNKED_T:
        b = B if t <= T else 2
        add(f"policy_loss GRPO fp32 T={t}", policy(f32, t=t, b=b, **grpo))
        add(f"policy_loss GSPO fp32 T={t}", policy(f32, t=t, b=b, **gspo))

    # clipped_surrogate: forward + backward of the per-token loss
    def surrogate(dt, t=T, grad=True, per_token_adv=False, old=True, **kw):
        def run():
            logp, old_logp, adv, mask, _ = _policy_inputs(torch, dt, B, t, per_token_adv=per_token_adv)
            if not grad:
                logp = logp.detach()
            loss = rlloss.clipped_surrogate(logp, old_logp if old else None, adv, mask, backend="triton", **kw)
            if grad:
                loss.sum().backward()
        return run

    for dn, dt in dtypes.items():
        add(f"clipped_surrogate token level {dn}", surrogate(dt))
        add(f"clipped_surrogate sequence level {dn}", surrogate(dt, level="sequence"))
    add("clipped_surrogate dual_clip, per-token adv fp32", surrogate(f32, per_token_adv=True, dual_clip=3.0))
    add("clipped_surrogate old_logp=None fp32", surrogate(f32, old=False))
    add("clipped_surrogate forward only fp32", surrogate(f32, grad=False))
    add(f"clipped_surrogate fp32 T={RAGGED_T}", surrogate(f32, t=RAGGED_T))

    # kl_estimate (elementwise over the flattened tensor: the row length does not matter)
    def kl(dt, kind, grad=True):
        def run():
            logp, _, _, _, ref = _policy_inputs(torch, dt, B, T)
            if not grad:
                logp = logp.detach()
            value = rlloss.kl_estimate(logp, ref, kind=kind, backend="triton")
            if grad:
                value.sum().backward()
        return run

    for dn, dt in dtypes.items():
        for kind in ("k1", "k2", "k3"):
            add(f"kl_estimate {kind} {dn}", kl(dt, kind))
    add("kl_estimate k3 forward only fp32", kl(f32, "k3", grad=False))

    # masked_mean
    def mmean(dt, dim, normalizer=None, t=T):
        def run():
            x, _, _, mask, _ = _policy_inputs(torch, dt, B, t)
            norm = normalizer() if callable(normalizer) else normalizer
            rlloss.masked_mean(x, mask, dim, normalizer=norm, backend="triton").sum().backward()
        return run

    for dn, dt in dtypes.items():
        add(f"masked_mean dim=-1 {dn}", mmean(dt, -1))
    add("masked_mean dim=None fp32", mmean(f32, None))
    add("masked_mean dim=0 fp32", mmean(f32, 0))
    add("masked_mean dim=-1 normalizer=float fp32", mmean(f32, -1, float(T)))
    add("masked_mean dim=-1 normalizer=tensor fp32", mmean(f32, -1, lambda: torch.full((B,), float(T))))
    add(f"masked_mean dim=-1 fp32 T={RAGGED_T}", mmean(f32, -1, t=RAGGED_T))
    add(f"masked_mean dim=-1 bf16 T={SHORT_T}", mmean(torch.bfloat16, -1, t=SHORT_T))

    # group_advantages, dynamic_sampling_mask, soft_overlong_penalty: a batch of 64 prompts x 16 samples
    n_prompts, g = 64, 16

    def rewards(dt=torch.float32, grad=False):
        gen = torch.Generator().manual_seed(1)
        r = torch.randint(0, 2, (n_prompts * g,), generator=gen).to(dt)
        return r.requires_grad_(True) if grad else r

    def group_ids():
        gen = torch.Generator().manual_seed(2)
        return torch.randperm(n_prompts * g, generator=gen) % n_prompts

    def adv(dt=torch.float32, ids=False, grad=True, **kw):
        def run():
            r = rewards(dt, grad=grad)
            grouping = {"groups": group_ids()} if ids else {"group_size": g}
            a = rlloss.group_advantages(r, **grouping, backend="triton", **kw)
            if grad:
                a.sum().backward()
        return run

    add("group_advantages GRPO fp32", adv())
    add("group_advantages GRPO bf16", adv(torch.bfloat16))
    add("group_advantages RLOO (loo) fp32", adv(baseline="loo"))
    add("group_advantages scale=batch fp32", adv(scale="batch"))
    add("group_advantages scale=none (Dr.GRPO) fp32", adv(scale="none"))
    add("group_advantages singleton=keep fp32", adv(singleton="keep"))
    add("group_advantages group ids fp32", adv(ids=True))
    add("group_advantages group ids, loo, scale=batch fp32", adv(ids=True, baseline="loo", scale="batch"))
    add("group_advantages forward only fp32", adv(grad=False))

    def dyn(dt, ids=False):
        def run():
            grouping = {"groups": group_ids()} if ids else {"group_size": g}
            rlloss.dynamic_sampling_mask(rewards(dt), **grouping, backend="triton")
        return run

    add("dynamic_sampling_mask fp32", dyn(torch.float32))
    add("dynamic_sampling_mask bool", dyn(torch.bool))
    add("dynamic_sampling_mask int64", dyn(torch.int64))
    add("dynamic_sampling_mask group ids fp32", dyn(torch.float32, ids=True))

    def overlong(dt):
        def run():
            gen = torch.Generator().manual_seed(3)
            lengths = torch.randint(0, 24000, (n_prompts * g,), generator=gen).to(dt)
            rlloss.soft_overlong_penalty(lengths, max_len=20480, cache_len=4096, backend="triton")
        return run

    for dn, dt in {"int64": torch.int64, "int32": torch.int32, "fp32": torch.float32}.items():
        add(f"soft_overlong_penalty {dn}", overlong(dt))

    # the other objectives and modifiers (fp32, and bf16 for the all-modifiers case)
    objectives = {"cispo": rlloss.CISPO(low=0.8), "sapo": rlloss.SAPO(), "reinforce": rlloss.Reinforce(),
                  "dppo_tv": rlloss.DPPO(), "dppo_kl": rlloss.DPPO(divergence="kl"), "dro": rlloss.DRO(beta=0.1),
                  "vespo": rlloss.VESPO(), "ppo_delta": rlloss.PPO(delta=1.5, dual_clip=3.0)}
    for name, objective in objectives.items():
        add(f"policy_loss objective={name} fp32", policy(f32, objective=objective))

    def modified(dt, weights_dim):
        def run():
            logp, old_logp, adv, mask, ref_logp = _policy_inputs(torch, dt, B, T)
            w = torch.rand((B,) if weights_dim == 1 else (B, T)).to(dt)
            res = rlloss.policy_loss(logp, old_logp, adv, mask, ref_logp=ref_logp, beta=0.04, kl="k3+",
                                     kl_bias_correction=True, token_weights=w, aggregation="token_sum",
                                     backend="triton")
            res.loss.backward()
        return run

    add("policy_loss token weights [B,T], k3+, bias correction, token_sum fp32", modified(f32, 2))
    add("policy_loss token weights [B], k3+, bias correction, token_sum bf16", modified(torch.bfloat16, 1))
    for kind in ("abs", "k1+"):
        add(f"kl_estimate {kind} fp32", kl(f32, kind))

    # token_logprobs and policy_loss_from_logits: a vocabulary of several chunks, and a small one
    def logits_run(dt, v, entropy=True, inplace=False, loss=False):
        def run():
            gen = torch.Generator().manual_seed(4)
            logits = torch.randn(2, 8, v, generator=gen).to(dt).requires_grad_(True)
            ids = torch.randint(0, v, (2, 8), generator=gen)
            if loss:
                x = logits * 1.0
                mask = torch.ones(2, 8, dtype=torch.bool)
                out = rlloss.policy_loss_from_logits(x, ids, None, torch.ones(2), mask, entropy_coef=0.01,
                                                     inplace_backward=inplace, backend="triton")
                out.loss.backward()
                return
            logp, ent = rlloss.token_logprobs(logits, ids, return_entropy=True, backend="triton")
            (logp.sum() + (ent.sum() if entropy else 0)).backward()
        return run

    for dn, dt in dtypes.items():
        add(f"token_logprobs V=32768 {dn}", logits_run(dt, 32768))
    add("token_logprobs V=1000 fp32, logp only", logits_run(f32, 1000, entropy=False))
    add("policy_loss_from_logits V=32768 bf16, in place", logits_run(torch.bfloat16, 32768, loss=True, inplace=True))

    # linear_token_logprobs (from hidden states): H = 4096, V = 1000 (not a multiple of the blocks)
    def hidden_run(dt, bias=True, entropy=True):
        def run():
            gen = torch.Generator().manual_seed(5)
            h = torch.randn(2, 8, 4096, generator=gen).to(dt).requires_grad_(True)
            w = torch.randn(1000, 4096, generator=gen).to(dt).requires_grad_(True)
            b = torch.randn(1000, generator=gen).to(dt).requires_grad_(True) if bias else None
            ids = torch.randint(0, 1000, (2, 8), generator=gen)
            logp, ent = rlloss.linear_token_logprobs(h, w, ids, bias=b, return_entropy=True, backend="triton")
            (logp.sum() + (ent.sum() if entropy else 0)).backward()
        return run

    for dn, dt in dtypes.items():
        add(f"linear_token_logprobs H=4096 V=1000 {dn}", hidden_run(dt))
    add("linear_token_logprobs bf16, no bias, logp only", hidden_run(torch.bfloat16, bias=False, entropy=False))
    return out


def _encode(value: Any) -> Any:
    """A constexpr value as JSON (tl dtypes as {"tl_dtype": name})."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if type(value).__name__ == "dtype" and hasattr(value, "primitive_bitwidth"):
        return {"tl_dtype": str(value)}
    raise TypeError(f"cannot record constexpr value {value!r} of type {type(value)}")


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "tl_dtype" in value:
        import triton.language as tl

        return tl.dtype(value["tl_dtype"])
    return value


def _capture_child(out_path: str, execute: bool) -> None:
    """Run every scenario under the interpreter and write the specialised launches as JSON."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction, create_function_from_signature

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
            "constexprs": [[list(p), _encode(v)] for p, v in sorted(constexprs.items())],
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


# --- compile (child process, no interpreter) -------------------------------------------------------

def _quiet_triton_warnings() -> None:
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
    _quiet_triton_warnings()
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
        src = ASTSource(fn, config["signature"], {tuple(p): _decode(v) for p, v in config["constexprs"]},
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


def finish_rows(results: list[tuple[dict[str, Any], bytes | None]]) -> list[dict[str, Any]]:
    """Disassemble the compiled kernels (one nvdisasm call per arch) and complete their rows."""
    rows = [row for row, _ in results]
    for arch, capability in ARCHS.items():
        todo = [(row, text) for row, text in results if row["arch"] == arch and text is not None]
        if not todo:
            continue
        listings = disassemble([text for _, text in todo], capability)
        for (row, _), sass in zip(todo, listings):
            code = parse_sass(sass)
            row.update(**code, spills=row["local_bytes"] > 0 or code["local_accesses"] > 0)
    return rows


def _compile_child(in_path: str, out_path: str, jobs: int) -> None:
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


def _label(config: dict[str, Any]) -> str:
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


LENGTH_ARGS = ("T", "L", "N", "n")  # the row length / element count a kernel's addresses are built from


def is_aligned(config: dict[str, Any]) -> bool:
    """Contiguous, aligned data as a real launch would see it: every pointer 16-byte aligned and the
    length argument divisible by 16 (or a constant), so vector accesses can be proved aligned."""
    sig = config["signature"]
    names = list(sig)
    divisible = {names[p[0]] for p, _ in config["attrs"]}
    pointers_ok = all(n in divisible for n, ty in sig.items() if ty.startswith("*"))
    lengths_ok = all(n in divisible or sig[n] == "constexpr" for n in LENGTH_ARGS if n in sig)
    return pointers_ok and lengths_ok


# The per-token float inputs of the token-streaming kernels, the promise of 128-bit loads checked
# per configuration: pointer -> (row stride, token stride) argument names (token stride None: the
# row is addressed as ``row * L + offs``, contiguous by construction), the row length argument and
# the block constexpr. The token mask (uint8, 8 per thread: 64 bits) is not counted.
TOKEN_INPUTS: dict[str, dict[str, Any]] = {
    "_policy_loss_fwd_kernel": {
        "pointers": {"logp_ptr": ("s_lp_b", "s_lp_t"), "old_ptr": ("s_old_b", "s_old_t"),
                     "adv_ptr": ("s_adv_b", "s_adv_t"), "ref_ptr": ("s_ref_b", "s_ref_t"),
                     "w_ptr": ("s_w_b", "s_w_t")},
        "length": "T", "block": "BLOCK_T"},
    "_row_log_ratio_kernel": {
        "pointers": {"logp_ptr": ("s_lp_b", "s_lp_t"), "old_ptr": ("s_old_b", "s_old_t")},
        "length": "T", "block": "BLOCK_T"},
    "_masked_sum_kernel": {"pointers": {"x_ptr": ("L", None)}, "length": "L", "block": "BLOCK"},
}
_DTYPE_BITS = {"fp32": 32, "bf16": 16, "fp16": 16}


def _constexpr_values(config: dict[str, Any]) -> dict[str, Any]:
    names = list(config["signature"])
    return {names[p[0]]: v for p, v in config["constexprs"]}


def token_pointers_read(config: dict[str, Any]) -> list[str]:
    """The per-token inputs a configuration of a ``TOKEN_INPUTS`` kernel really reads (its constexpr
    switches leave the others unread, or their values unused, so the compiler drops the loads).

    ``_policy_loss_fwd_kernel`` (listing only what is surely read, so the expectation is a floor):
    ``logp`` where the objective's value uses it (CISPO, REINFORCE, DPPO, DRO, VESPO) or the KL
    term reaches the loss or the metrics; ``old_logp`` where the token's own log-ratio is used
    (PPO/CISPO/SAPO without a row statistic, DPPO, DRO); ``adv`` with ``ADV_PER_TOKEN``;
    ``ref_logp`` with the KL term; the token weights with ``WEIGHTS == 2``.
    """
    kernel = config["kernel"]
    if kernel not in TOKEN_INPUTS:
        return []
    if kernel != "_policy_loss_fwd_kernel":
        return list(TOKEN_INPUTS[kernel]["pointers"])
    f = _constexpr_values(config)
    obj, row_stat = f.get("OBJ", 0), f.get("ROW_STAT", 0)
    kl_used = bool(f["HAS_REF"]) and (bool(f["ADD_KL"]) or bool(f["WRITE_PARTIALS"]))
    read = []
    if obj in (1, 3, 4, 5, 6, 7) or kl_used:
        read.append("logp_ptr")
    if f["HAS_OLD"] and (obj in (4, 5, 6) or (obj in (0, 1, 2) and row_stat == 0)):
        read.append("old_ptr")
    if f["ADV_PER_TOKEN"]:
        read.append("adv_ptr")
    if kl_used:
        read.append("ref_ptr")
    if f.get("WEIGHTS", 0) == 2:
        read.append("w_ptr")
    return read


def expected_vector_loads(config: dict[str, Any]) -> dict[str, int]:
    """For each per-token input a configuration reads: how many 128-bit loads (``LDG.128``) per thread
    it must take, 0 where they cannot be proved aligned.

    An input vectorises to 128 bits when its pointer is 16-byte aligned, its tokens are contiguous
    (token stride the constant 1), its row stride and the row length are divisible by 16, and a
    thread holds at least 128 bits of it: ``BLOCK / (32 * num_warps)`` elements of 32 bits (fp32)
    or 16 bits (bf16, fp16), so 4 fp32 or 8 bf16/fp16 per thread. Then it takes
    ``elements * bits / 128`` LDG.128 per thread.
    """
    kernel = config["kernel"]
    if kernel not in TOKEN_INPUTS:
        return {}
    spec = TOKEN_INPUTS[kernel]
    sig = config["signature"]
    names = list(sig)
    divisible = {names[p[0]] for p, _ in config["attrs"]}
    consts = _constexpr_values(config)
    per_thread = consts[spec["block"]] // (32 * config["options"].get("num_warps", 4))
    length_ok = spec["length"] in divisible
    out = {}
    for ptr in token_pointers_read(config):
        row_stride, token_stride = spec["pointers"][ptr]
        bits = _DTYPE_BITS.get(sig[ptr].removeprefix("*"), 0)
        contiguous = token_stride is None or consts.get(token_stride) == 1
        aligned = ptr in divisible and row_stride in divisible and length_ok
        ok = bits and contiguous and aligned and per_thread * bits >= 128
        out[ptr] = per_thread * bits // 128 if ok else 0
    return out


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
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                    and isinstance(node.func.value, ast.Name)):
                found.add((f"rlloss.kernels.{path.stem}", node.func.value.id))
    return sorted(found)


def capture_configs(*, execute: bool = False, timeout: float = 600) -> dict[str, Any]:
    """The distinct kernel launches of every scenario, specialised as on a GPU (child process).

    ``execute`` also runs each kernel in the interpreter (slower; outputs are otherwise left
    uninitialised, which the dispatch, a function of shapes and options only, never reads).
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "capture.json")
        _run_child(["--_capture", out] + (["--_execute"] if execute else []), interpret=True, timeout=timeout)
        captured = json.loads(Path(out).read_text())
    captured["configs"].sort(key=lambda c: (c["module"], c["kernel"], _label(c)))
    for i, config in enumerate(captured["configs"]):
        config["id"] = i
        config["label"] = _label(config)
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
        _quiet_triton_warnings()
        _capture_child(args._capture, args._execute)
        return 0
    if args._compile:
        _compile_child(*args._compile, jobs=args.jobs or 1)
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
