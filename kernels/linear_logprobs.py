"""Token log-probs and entropy straight from hidden states and the LM head: no ``[N, V]`` logits.

Mirrors ``rlloss.hidden._linear_token_logprobs_torch`` (logits ``z = (hidden @ weight.T + bias) / T``,
then ``token_logprobs``) without ever writing a tile of logits to memory:

* ``_linear_fwd_kernel``: one program per block of (packed) tokens walks the vocabulary in blocks;
  each logits tile is a ``tl.dot`` over ``H`` held in registers, folded into per-token running
  statistics: the max ``m`` (starting at -inf), ``s = sum exp(z - m)``, ``u = sum exp(z - m) (z - m)``
  (the entropy's sum taken against the running max, rescaled when it moves, so logits near 1e4 lose
  no digits) and the target logit, picked out of the same tile (so ``logp <= 0`` always).
  With ``HIDDEN_GRAD`` (only the log-prob will carry a gradient) it also adds ``exp(z - m) @ weight``
  over the other tokens into its own fp32 rows, rescaled as ``s`` is (flash attention's ``P @ V``),
  and the other tokens' mass ``sx``; ``_linear_finish_kernel`` (after the shards' statistics are
  combined, with ``group``) makes them ``d logp / d hidden = ((1 - p_id) weight[id] - sum_{v != id}
  p_v weight[v]) / T``: backward then scales those rows by the upstream gradient, with no matmul
  for ``d hidden``.
* ``_linear_dh_kernel``: one program per token block recomputes its logits tiles, forms
  ``d logits`` in registers and adds ``d logits @ weight`` into its own rows of an fp32 ``d hidden``
  accumulator (all of ``d hidden``, or the entropy's part after a ``HIDDEN_GRAD`` forward).
* ``_linear_dw_kernel``: one program per vocabulary block loops over the token blocks in order,
  recomputes the tiles and adds ``d logits^T @ hidden`` into its own rows of an fp32 ``d weight``
  accumulator, and sums ``d bias`` in registers.

Every accumulator row has one owner program and a fixed loop order: no atomics, bitwise
deterministic. The accumulators live in memory (an fp32 ``[N, H]`` or ``[V, H]`` does not fit on
chip), read and written once per tile: long, thin backward tiles keep that traffic down, and
``benchmarks/bench_hidden.py`` counts it. Tokens are packed valid-first (``pack_valid``: ``order``, a stable sort of the mask,
and ``count``, the number of valid tokens, both on the device): programs past ``count`` return at
once, so padding costs no matmul and its ids are never read. ``vocab_start`` (a device scalar) is
the first global id of this weight shard (0 without tensor parallelism).

Precision: products accumulate in fp32; fp32 inputs use ``input_precision="ieee"`` (full fp32
products, as torch's default matmul), bf16/fp16 inputs run on tensor cores. ``d logits``, and
the forward's ``exp(z - m)`` tile before ``P @ W``, are rounded to the input dtype before their
matmuls (tensor cores need it), the accumulation stays fp32. Triton's interpreter multiplies bf16
``tl.dot`` operands as integers, so there (``INTERPRETER_BF16``, never set on a GPU) bf16 tiles
are upcast to fp32 first: the same values, exact products (fp16 runs its own path in the
interpreter too).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# (BLOCK_N tokens, BLOCK_V vocabulary, BLOCK_H hidden, warps) per kernel. The backward kernels, and the
# forward that forms d logp / d hidden, add each tile's product into an fp32 accumulator in memory
# (read, add, write): [N, H] rows once per vocabulary block, d weight once per token block, so their
# bytes fall as BLOCK_V ([N, H]) and BLOCK_N (d weight) grow: long, thin tiles there. Both forwards
# (with and without d logp / d hidden) take one tile: the same tiles sum the statistics in the same
# order, so a no-grad call (old or reference log-probs) and the training call give bitwise the same
# log-probs, and an on-policy ratio is exactly 1. d weight without the entropy's terms ("dw") has
# the registers for 512 tokens per tile; with them ("dw_ent") it spills there. fp32 products ("ieee")
# are FFMAs from registers, so fp32 takes small tiles, or it spills (benchmarks/compile/gpu_compile.py
# checks every configuration).
BLOCKS: dict[str, dict[str, tuple[int, int, int, int]]] = {
    "16bit": {"fwd": (32, 256, 64, 8), "dh": (32, 256, 32, 8), "dw": (512, 32, 32, 8), "dw_ent": (256, 32, 64, 8)},
    "fp32": {"fwd": (32, 32, 32, 4), "dh": (32, 32, 32, 4), "dw": (32, 32, 32, 4), "dw_ent": (32, 32, 32, 4)},
}


FINISH_BLOCKS = (16, 128)  # (rows, hidden columns) per step of the elementwise finish


def blocks(dtype: torch.dtype, kernel: str) -> tuple[int, int, int, int]:
    """``(BLOCK_N, BLOCK_V, BLOCK_H, num_warps)`` of ``kernel`` (``"fwd" | "dh" | "dw" | "dw_ent"``) for
    ``dtype`` inputs."""
    return BLOCKS["fp32" if dtype == torch.float32 else "16bit"][kernel]


def interpreter_bf16(dtype: torch.dtype) -> bool:
    """True for bf16 inputs in Triton's interpreter, whose bf16 ``tl.dot`` is wrong (see the module doc)."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _packed_rows(order_ptr, n0, count, BLOCK_N: tl.constexpr):
    """Original row index of packed tokens ``n0 .. n0 + BLOCK_N`` and which of them are valid."""
    idx = n0 + tl.arange(0, BLOCK_N)
    ok = idx < count
    rows = tl.load(order_ptr + idx, mask=ok, other=0).to(tl.int64)
    return rows, ok


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H, s_hn, s_hh, s_wv, s_wh, temperature,
                 HAS_BIAS: tl.constexpr, INTERPRETER_BF16: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """``z = (hidden[rows] @ weight[cols].T + bias[cols]) / temperature``, fp32, in registers."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hk = h0 + tl.arange(0, BLOCK_H)
        hk_ok = hk < H
        a = tl.load(h_ptr + rows[:, None] * s_hn + hk[None, :] * s_hh, mask=row_ok[:, None] & hk_ok[None, :], other=0.0)
        b = tl.load(w_ptr + cols[None, :].to(tl.int64) * s_wv + hk[:, None] * s_wh, mask=hk_ok[:, None] & col_ok[None, :], other=0.0)
        if INTERPRETER_BF16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc / temperature


@triton.jit
def _add_rows_times_weight(acc_ptr, w_ptr, x, scale, rows, tok_ok, cols, col_ok, H, s_wv, s_wh,
                           RESCALE: tl.constexpr, INTERPRETER_BF16: tl.constexpr, BLOCK_H: tl.constexpr):
    """``acc[rows] = scale * acc[rows] + x @ weight[cols]`` (``scale`` 1 without ``RESCALE``) in the fp32
    ``[N, H]`` accumulator, ``BLOCK_H`` columns at a time: this program owns these rows (read, add,
    write; no atomics)."""
    for h0 in range(0, H, BLOCK_H):
        hk = h0 + tl.arange(0, BLOCK_H)
        hk_ok = hk < H
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * s_wv + hk[None, :] * s_wh,
                    mask=col_ok[:, None] & hk_ok[None, :], other=0.0)
        if INTERPRETER_BF16:
            w = w.to(tl.float32)
        at = acc_ptr + rows[:, None] * H + hk[None, :]
        keep = tok_ok[:, None] & hk_ok[None, :]
        acc = tl.load(at, mask=keep, other=0.0)
        if RESCALE:
            acc = acc * scale[:, None]
        acc = tl.dot(x, w, acc, input_precision="ieee")
        tl.store(at, acc, mask=keep)


@triton.jit
def _linear_finish_kernel(acc_ptr, w_ptr, ids_ptr, start_ptr, coef_ptr, omp_ptr, N, H, s_wv, s_wh, s_ids,
                          inv_temperature, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    """``acc = (omp * weight[id - start] + coef * acc) / T`` per row, in place: ``d logp / d hidden``
    from the forward's ``sum_{v != id} exp(z - m) weight[v]``, with ``coef = -exp(m - M) / S`` and
    ``omp = 1 - p_id`` where this shard holds the id (0 elsewhere: no ``weight`` row is read there)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = rows < N
    coef = tl.load(coef_ptr + rows, mask=ok, other=0.0)
    omp = tl.load(omp_ptr + rows, mask=ok, other=0.0)
    own = ok & (omp != 0.0)  # p_id = 1 exactly has no weight term either
    local = tl.load(ids_ptr + rows.to(tl.int64) * s_ids, mask=own, other=0).to(tl.int64) - tl.load(start_ptr)
    local = tl.where(own, local, 0)  # never an address from a padding id, even masked
    for h0 in range(0, H, BLOCK_H):
        hk = h0 + tl.arange(0, BLOCK_H)
        hk_ok = (hk < H)[None, :]
        at = acc_ptr + rows.to(tl.int64)[:, None] * H + hk[None, :]
        w_id = tl.load(w_ptr + local[:, None] * s_wv + hk[None, :] * s_wh, mask=own[:, None] & hk_ok,
                       other=0.0).to(tl.float32)
        rest = tl.load(at, mask=ok[:, None] & hk_ok, other=0.0)
        # times 1 / T: a division's slow path would take a stack frame (local memory) on the GPU
        tl.store(at, (omp[:, None] * w_id + coef[:, None] * rest) * inv_temperature, mask=ok[:, None] & hk_ok)


@triton.jit
def _linear_fwd_kernel(
    h_ptr, w_ptr, b_ptr, ids_ptr, order_ptr, count_ptr, start_ptr,
    m_ptr, s_ptr, u_ptr, zt_ptr, acc_ptr, sx_ptr,
    V, H, s_hn, s_hh, s_wv, s_wh, s_ids, temperature,
    HAS_BIAS: tl.constexpr, HIDDEN_GRAD: tl.constexpr, INTERPRETER_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    n0 = tl.program_id(0) * BLOCK_N
    count = tl.load(count_ptr)
    if n0 < count:  # packed padding: nothing to do
        rows, tok_ok = _packed_rows(order_ptr, n0, count, BLOCK_N)
        local = tl.load(ids_ptr + rows * s_ids, mask=tok_ok, other=0).to(tl.int64) - tl.load(start_ptr)
        m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK_N,), tl.float32)
        u = tl.zeros((BLOCK_N,), tl.float32)
        zt = tl.zeros((BLOCK_N,), tl.float32)
        sx = tl.zeros((BLOCK_N,), tl.float32)  # HIDDEN_GRAD: sum of exp(z - m) over the other tokens
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, tok_ok, cols, col_ok, H, s_hn, s_hh, s_wv, s_wh, temperature,
                             HAS_BIAS, INTERPRETER_BF16, BLOCK_N, BLOCK_V, BLOCK_H)
            z = tl.where(col_ok[None, :], z, float("-inf"))
            is_target = (cols[None, :] == local[:, None]) & col_ok[None, :]  # ids of other shards match no column
            zt += tl.sum(tl.where(is_target, z, 0.0), axis=1)
            m_new = tl.maximum(m, tl.max(z, axis=1))
            alpha = tl.exp(m - m_new)
            e = tl.exp(z - m_new[:, None])  # 0 outside the vocabulary
            shift = tl.where(s > 0, s * (m - m_new), 0.0)  # never 0 * -inf on the first block
            u = alpha * (u + shift) + tl.sum(tl.where(e > 0, e * (z - m_new[:, None]), 0.0), axis=1)
            s = s * alpha + tl.sum(e, axis=1)
            m = m_new
            if HIDDEN_GRAD:  # sum over v != id of exp(z - m) weight[v], rescaled with s: P @ W of flash attention
                ex = tl.where(is_target, 0.0, e)
                sx = sx * alpha + tl.sum(ex, axis=1)
                if not INTERPRETER_BF16:
                    ex = ex.to(w_ptr.dtype.element_ty)
                _add_rows_times_weight(acc_ptr, w_ptr, ex, alpha, rows, tok_ok, cols, col_ok, H, s_wv, s_wh,
                                       True, INTERPRETER_BF16, BLOCK_H)
        if HIDDEN_GRAD:
            tl.store(sx_ptr + rows, sx, mask=tok_ok)
        tl.store(m_ptr + rows, m, mask=tok_ok)
        tl.store(s_ptr + rows, s, mask=tok_ok)
        tl.store(u_ptr + rows, u, mask=tok_ok)
        tl.store(zt_ptr + rows, zt, mask=tok_ok)


@triton.jit
def _d_logits(z, cols, col_ok, tok_ok, local, m, log_s, ent, g_logp, g_ent, temperature, HAS_ENT_GRAD: tl.constexpr):
    """``d z = g_l (1[v = id] - p) - g_H p (log p + H)``, divided by the temperature; 0 off the tile.

    ``log p = (z - m) - log s``: never ``z - lse`` with ``lse`` rounded near ``|z|`` (1e4 would cost 5e-4).
    """
    log_p = (z - m[:, None]) - log_s[:, None]
    p = tl.where(col_ok[None, :], tl.exp(log_p), 0.0)  # no exp overflow past the vocabulary
    dz = g_logp[:, None] * (tl.where(cols[None, :] == local[:, None], 1.0, 0.0) - p)
    if HAS_ENT_GRAD:
        dz -= tl.where(p > 0, g_ent[:, None] * p * (log_p + ent[:, None]), 0.0)
    return tl.where(tok_ok[:, None] & col_ok[None, :], dz / temperature, 0.0)


@triton.jit
def _token_grads_in(ids_ptr, start_ptr, m_ptr, ls_ptr, ent_ptr, gl_ptr, ge_ptr, rows, tok_ok, s_ids,
                    HAS_ENT_GRAD: tl.constexpr):
    local = tl.load(ids_ptr + rows * s_ids, mask=tok_ok, other=0).to(tl.int64) - tl.load(start_ptr)
    m = tl.load(m_ptr + rows, mask=tok_ok, other=0.0)
    log_s = tl.load(ls_ptr + rows, mask=tok_ok, other=0.0)
    g_logp = tl.load(gl_ptr + rows, mask=tok_ok, other=0.0).to(tl.float32)
    ent = tl.zeros_like(m)
    g_ent = tl.zeros_like(m)
    if HAS_ENT_GRAD:
        ent = tl.load(ent_ptr + rows, mask=tok_ok, other=0.0)
        g_ent = tl.load(ge_ptr + rows, mask=tok_ok, other=0.0).to(tl.float32)
    return local, m, log_s, ent, g_logp, g_ent


@triton.jit
def _linear_dh_kernel(
    h_ptr, w_ptr, b_ptr, ids_ptr, order_ptr, count_ptr, start_ptr,
    m_ptr, ls_ptr, ent_ptr, gl_ptr, ge_ptr, dh_ptr,
    V, H, s_hn, s_hh, s_wv, s_wh, s_ids, temperature,
    HAS_BIAS: tl.constexpr, HAS_ENT_GRAD: tl.constexpr, INTERPRETER_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    n0 = tl.program_id(0) * BLOCK_N
    count = tl.load(count_ptr)
    if n0 < count:
        rows, tok_ok = _packed_rows(order_ptr, n0, count, BLOCK_N)
        local, m, log_s, ent, g_logp, g_ent = _token_grads_in(ids_ptr, start_ptr, m_ptr, ls_ptr, ent_ptr, gl_ptr, ge_ptr,
                                                                rows,
                                                         tok_ok, s_ids, HAS_ENT_GRAD)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, tok_ok, cols, col_ok, H, s_hn, s_hh, s_wv, s_wh, temperature,
                             HAS_BIAS, INTERPRETER_BF16, BLOCK_N, BLOCK_V, BLOCK_H)
            dl = _d_logits(z, cols, col_ok, tok_ok, local, m, log_s, ent, g_logp, g_ent, temperature, HAS_ENT_GRAD)
            if not INTERPRETER_BF16:
                dl = dl.to(w_ptr.dtype.element_ty)
            _add_rows_times_weight(dh_ptr, w_ptr, dl, m, rows, tok_ok, cols, col_ok, H, s_wv, s_wh,
                                   False, INTERPRETER_BF16, BLOCK_H)


@triton.jit
def _linear_dw_kernel(
    h_ptr, w_ptr, b_ptr, ids_ptr, order_ptr, count_ptr, start_ptr,
    m_ptr, ls_ptr, ent_ptr, gl_ptr, ge_ptr, dw_ptr, db_ptr,
    V, H, s_hn, s_hh, s_wv, s_wh, s_ids, temperature,
    HAS_BIAS: tl.constexpr, HAS_ENT_GRAD: tl.constexpr, INTERPRETER_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    count = tl.load(count_ptr)
    db = tl.zeros((BLOCK_V,), tl.float32)
    for n0 in range(0, count, BLOCK_N):  # token blocks in order: a fixed summation order
        rows, tok_ok = _packed_rows(order_ptr, n0, count, BLOCK_N)
        local, m, log_s, ent, g_logp, g_ent = _token_grads_in(ids_ptr, start_ptr, m_ptr, ls_ptr, ent_ptr, gl_ptr, ge_ptr,
                                                                rows,
                                                         tok_ok, s_ids, HAS_ENT_GRAD)
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, tok_ok, cols, col_ok, H, s_hn, s_hh, s_wv, s_wh, temperature,
                         HAS_BIAS, INTERPRETER_BF16, BLOCK_N, BLOCK_V, BLOCK_H)
        dl = _d_logits(z, cols, col_ok, tok_ok, local, m, log_s, ent, g_logp, g_ent, temperature, HAS_ENT_GRAD)
        if HAS_BIAS:
            db += tl.sum(dl, axis=0)
        dlt = tl.trans(dl)
        if not INTERPRETER_BF16:
            dlt = dlt.to(h_ptr.dtype.element_ty)
        for h0 in range(0, H, BLOCK_H):  # this program owns these rows of d weight
            hk = h0 + tl.arange(0, BLOCK_H)
            hk_ok = hk < H
            h = tl.load(h_ptr + rows[:, None] * s_hn + hk[None, :] * s_hh, mask=tok_ok[:, None] & hk_ok[None, :],
                        other=0.0)
            if INTERPRETER_BF16:
                h = h.to(tl.float32)
            at = dw_ptr + cols[:, None].to(tl.int64) * H + hk[None, :]
            keep = col_ok[:, None] & hk_ok[None, :]
            acc = tl.load(at, mask=keep, other=0.0)
            acc = tl.dot(dlt, h, acc, input_precision="ieee")
            tl.store(at, acc, mask=keep)
    if HAS_BIAS:
        tl.store(db_ptr + cols, db, mask=col_ok)


def pack_valid(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, count)``: token indices, valid ones first in their original order, and how many are valid.

    A stable sort of ``~valid`` on the device: no host sync, whatever the mask.
    """
    order = torch.sort((~valid).to(torch.uint8), stable=True).indices
    return order, valid.sum().reshape(1)


def _launch_args(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> tuple:
    return (weight.shape[0], hidden.shape[1], hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            ids.stride(0))


def linear_stats(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor,
                 valid: torch.Tensor, vocab_start: torch.Tensor, temperature: float, hidden_grad: bool = False
                 ) -> tuple[torch.Tensor, ...]:
    """Per-token ``(m, s, u, zt, acc, sx)`` over this weight shard: ``m, s, u, zt`` fp32 ``[N]``,
    ``(0, 1, 0, 0)`` where not valid.

    ``hidden`` ``[N, H]``, ``weight`` ``[V, H]`` (any strides), ``ids`` ``[N]`` global ids,
    ``valid`` bool ``[N]``, ``vocab_start`` int64 ``[1]``. ``zt`` is 0 where the id is outside the shard.
    With ``hidden_grad``, in the same pass (one more matmul, ``P @ W``): ``acc`` fp32 ``[N, H]``, the
    sum over this shard's tokens other than the id of ``exp(z - m) weight[v]``, and ``sx`` fp32
    ``[N]``, the sum of their ``exp(z - m)`` (0 where not valid); ``finish_logp_hidden_grad`` turns
    them into ``d logp / d hidden``. Else both ``[0]``.
    """
    N = hidden.shape[0]
    dev = hidden.device
    m = torch.zeros(N, dtype=torch.float32, device=dev)
    s = torch.ones(N, dtype=torch.float32, device=dev)
    u = torch.zeros(N, dtype=torch.float32, device=dev)
    zt = torch.zeros(N, dtype=torch.float32, device=dev)
    acc = torch.zeros(hidden.shape if hidden_grad else (0,), dtype=torch.float32, device=dev)
    sx = torch.zeros(N if hidden_grad else 0, dtype=torch.float32, device=dev)
    if N:
        order, count = pack_valid(valid)
        bn, bv, bh, warps = blocks(hidden.dtype, "fwd")
        _linear_fwd_kernel[(triton.cdiv(N, bn),)](
            hidden, weight, bias if bias is not None else weight, ids, order, count, vocab_start, m, s, u, zt,
            acc if hidden_grad else m, sx if hidden_grad else m, *_launch_args(hidden, weight, ids),
            float(temperature), HAS_BIAS=bias is not None, HIDDEN_GRAD=hidden_grad,
            INTERPRETER_BF16=interpreter_bf16(hidden.dtype), BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, num_warps=warps,
        )
    return m, s, u, zt, acc, sx


def finish_logp_hidden_grad(acc: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, vocab_start: torch.Tensor,
                            coef: torch.Tensor, one_minus_p: torch.Tensor, temperature: float) -> None:
    """``acc = (one_minus_p * weight[ids - vocab_start] + coef * acc) / T``, in place, row by row.

    With ``acc`` from ``linear_stats(hidden_grad=True)``, ``coef = -exp(m - M) / S`` (``M``, ``S`` the
    max and the sum of ``exp(z - M)`` over the whole vocabulary) and ``one_minus_p = 1 - p_id`` where
    this shard holds the id (0 elsewhere and where not valid: ``coef`` 0 there too), this is the
    shard's part of ``d logp / d hidden = ((1 - p_id) weight[id] - sum_{v != id} p_v weight[v]) / T``.
    ``1 - p_id`` is the other tokens' mass summed directly, never ``1 - p`` rounded near 1.
    """
    N, H = acc.shape if acc.dim() == 2 else (0, 0)
    if N:
        bn, bh = FINISH_BLOCKS
        _linear_finish_kernel[(triton.cdiv(N, bn),)](acc, weight, ids, vocab_start, coef.contiguous(),
                                                     one_minus_p.contiguous(), N, H, weight.stride(0),
                                                     weight.stride(1), ids.stride(0), 1.0 / float(temperature),
                                                     BLOCK_N=bn, BLOCK_H=bh)


def linear_grads(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor,
                 valid: torch.Tensor, vocab_start: torch.Tensor, m: torch.Tensor, log_s: torch.Tensor,
                 entropy: torch.Tensor, g_logp: torch.Tensor, g_entropy: torch.Tensor | None, temperature: float,
                 hidden_grad_fp32: bool = False, dlogp_dh: torch.Tensor | None = None, hidden_needed: bool = True,
                 weight_needed: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(d hidden, d weight, d bias)`` in the inputs' dtypes, from the global max ``m``, ``log_s``
    (``lse = m + log_s``) and ``entropy`` ``[N]``; ``d hidden`` stays fp32 with ``hidden_grad_fp32``
    (a vocabulary-parallel caller sums the shards before its one rounding).

    ``d hidden`` is this shard's contribution (a vocabulary-parallel caller sums it over ranks).
    With ``dlogp_dh`` (``linear_stats(hidden_grad=True)``), the log-prob's part of ``d hidden`` is
    ``g_logp * dlogp_dh`` and only an entropy gradient recomputes the logits for ``d hidden``.
    What is not needed is None and costs nothing: ``hidden_needed=False`` (frozen hidden states)
    skips ``d hidden``, ``weight_needed=False`` (a frozen head, as with LoRA) skips ``d weight`` and
    ``d bias``, and with them the kernel that recomputes the logits for them.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    valid_g = torch.where(valid, g_logp, torch.zeros((), dtype=g_logp.dtype, device=dev)).float()
    has_ent = g_entropy is not None
    dh = dw = db = None
    if hidden_needed:
        if dlogp_dh is None:
            dh = torch.zeros((N, H), dtype=torch.float32, device=dev)
        elif has_ent or hidden_grad_fp32:  # the entropy's part is added to it in fp32 below
            dh = valid_g[:, None] * dlogp_dh
        else:  # rounded once, into the gradient (on CUDA no fp32 [N, H] temporary; the CPU makes one)
            dh = torch.mul(dlogp_dh, valid_g[:, None], out=torch.empty((N, H), dtype=hidden.dtype, device=dev))
    if weight_needed:
        dw = torch.zeros((V, H), dtype=torch.float32, device=dev)
        db = torch.zeros(V, dtype=torch.float32, device=dev) if bias is not None else None
    if N:
        order, count = pack_valid(valid)
        g_ent = g_entropy.contiguous() if has_ent else valid_g
        common = (hidden, weight, bias if bias is not None else weight, ids, order, count, vocab_start,
                  m.contiguous(), log_s.contiguous(), entropy.contiguous())
        flags = dict(HAS_BIAS=bias is not None, INTERPRETER_BF16=interpreter_bf16(hidden.dtype))
        args = (*_launch_args(hidden, weight, ids), float(temperature))
        if hidden_needed and (dlogp_dh is None or has_ent):
            # d hidden from recomputed logits: all of it, or (after the forward's log-prob part) the entropy's
            g_dh = valid_g if dlogp_dh is None else torch.zeros_like(valid_g)
            bn, bv, bh, warps = blocks(hidden.dtype, "dh")
            _linear_dh_kernel[(triton.cdiv(N, bn),)](*common, g_dh, g_ent, dh, *args, **flags, HAS_ENT_GRAD=has_ent,
                                                     BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, num_warps=warps)
        if weight_needed:
            bn, bv, bh, warps = blocks(hidden.dtype, "dw_ent" if has_ent else "dw")
            _linear_dw_kernel[(triton.cdiv(V, bv),)](*common, valid_g, g_ent, dw, db if db is not None else dw, *args,
                                                     **flags, HAS_ENT_GRAD=has_ent, BLOCK_N=bn, BLOCK_V=bv,
                                                     BLOCK_H=bh, num_warps=warps)
    return (dh if dh is None or hidden_grad_fp32 else dh.to(hidden.dtype),
            None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype))


def finish_stats(m: torch.Tensor, s: torch.Tensor, u: torch.Tensor, zt: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp, entropy, log_s)`` from a token's statistics over the whole vocabulary (``lse = m + log_s``).

    ``logp = min((zt - m) - log s, 0)`` and ``entropy = log s - u / s``: differences of nearby
    numbers are taken first, never against a rounded ``lse`` (near |z| = 1e4 fp32's spacing is
    1e-3). ``zt <= m`` already holds for the kernel's own tile; the bound also covers a target
    logit summed across shards.
    """
    log_s = torch.log(s)
    return torch.clamp((zt - m) - log_s, max=0.0), log_s - u / s, log_s
