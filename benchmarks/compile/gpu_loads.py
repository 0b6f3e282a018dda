"""The promise of 128-bit loads, worked out per kernel configuration from its specialisation.

Pure functions of a captured configuration (``gpu_capture.py``'s records): which per-token inputs a
configuration reads, whether they can be proved aligned, and how many ``LDG.128`` per thread each
must take. ``gpu_compile.py`` compares them with the SASS that ``gpu_sass.py`` reads.
"""

from __future__ import annotations

from typing import Any


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
