"""Reading the machine code of a compiled kernel: resources, SASS instructions, occupancy.

No GPU is needed: the cubins come from Triton's compiler run for a named target, and are read with
the ``cuobjdump`` and ``nvdisasm`` shipped in the triton wheel (``gpu_build.py`` compiles; this
module only reads). Standard library only at import time: the compile processes fork after it.

Theoretical occupancy, per SM, for a block of ``W = num_warps`` warps using ``R`` registers per
thread and ``S`` bytes of shared memory (the CUDA occupancy calculator's rules for sm_80/sm_90)::

    blocks = min(32,                                   # resident blocks per SM
                 64 // W,                              # 64 warps (2048 threads) per SM
                 (65536 // (ceil(32 R / 256) * 256)) // W,   # registers, 256-register units per warp
                 smem_SM // (ceil(S / 128) * 128 + 1024))    # shared memory, 1 KiB reserved per block
    occupancy = blocks * W / 64

with ``smem_SM`` = 164 KiB on sm_80 (A100) and 228 KiB on sm_90 (H100).
"""

from __future__ import annotations

import math
import os
import re
import struct
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

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
    """Counts of global loads/stores by width, atomics, tensor-core multiplies, barriers and local-memory
    accesses in a SASS listing."""
    ldg: Counter[int] = Counter()
    stg: Counter[int] = Counter()
    atomics: Counter[str] = Counter()
    mma: Counter[str] = Counter()
    local = 0
    barriers = 0
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
        if base == "BAR":  # a thread-block barrier (Triton's reductions, tl.debug_barrier)
            barriers += 1
    return {
        "instructions": opcodes,
        "ldg": {str(w): n for w, n in sorted(ldg.items(), reverse=True)},
        "stg": {str(w): n for w, n in sorted(stg.items(), reverse=True)},
        "atomics": dict(atomics),
        "mma": dict(mma),
        "barriers": barriers,
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

