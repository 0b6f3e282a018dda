"""Token log-probs, entropy and the loss's gradient from hidden states and the LM head, one bounded
logits tile at a time: never the ``[N, V]`` logits.

Mirrors ``rlloss.hidden._linear_token_logprobs_torch`` (logits ``z = (hidden @ weight.T + bias) / T``,
then ``token_logprobs``). The tokens, valid ones packed first on the device (``pack_valid``: a stable
sort of the mask, no host sync), go through in chunks of ``C``; each chunk's logits over the whole
(local) vocabulary are one fp32 tile ``[C, V]``, the product of a library matmul (cuBLAS on CUDA,
with ``out_dtype=torch.float32`` for 16-bit inputs where torch has it: bf16 operands, fp32
accumulation and output; an fp32 upcast elsewhere, the CPU included), which Triton row epilogues
read:

* ``_tile_stats_kernel``: one program per token row, ``row_softmax_stats`` (``kernels.logits``) of
  ``(tile + bias) / T``: the max ``m``, ``s = sum exp(z - m)``, ``u = sum exp(z - m) (z - m)`` (the
  entropy's sum against the running max) and the target logit ``zt``. ``finish_stats`` turns them
  into ``logp``, the entropy and the logsumexp (after a vocabulary-parallel caller has combined
  the shards' statistics).
* ``_logits_bwd_kernel`` (``kernels.logits``, shared with the from-logits path): ``d logits =
  (g_l (1[v = id] - p) - g_H p (log p + H)) / T`` written over the tile: fp32 in place for an fp32
  head; for a 16-bit head, in its dtype into the first half of each fp32 row (tensor cores need
  16-bit operands, and no second buffer is needed). Then ``d hidden = d logits @ weight`` (the
  chunk's rows, complete: the tile spans the whole vocabulary) and ``d weight += d logits^T @
  hidden`` (fp32 accumulator), both by the library matmul; ``d bias`` sums the rows in fp32.

``run_chunks`` is the one loop every path takes, per chunk: gather the rows, the tile, its
statistics, then (when a gradient is wanted) the per-token upstream gradients and ``d logits``:

* the loss path (``policy_loss_from_hidden`` with a token-local objective): the upstream
  gradients are the loss's own, known once the chunk's log-probs are, so the forward forms the
  gradients: 3 matmuls over the head (logits, ``d hidden``, ``d weight``); backward scales them;
* the general path (``linear_token_logprobs``, any upstream gradient): the forward keeps
  ``lse`` and the entropy, backward recomputes each tile: 4 matmuls.

Memory: one tile (``tile_tokens``), the fp32 ``d weight`` accumulator and ``O(N)``; no ``N x V``
term. No atomics (every output row has one owner, every sum a fixed order): bitwise
deterministic. Padding positions, packed last, are never read by the epilogues (their ids neither)
but are in the matmuls' shapes: the chunk count comes from ``N``, not from the valid count, which
only the device knows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .logits import _logits_bwd_kernel, block_v, row_softmax_stats

# The default tile (``tile_tokens``): beyond inputs, outputs and gradients TRL 1.16's head holds fp32
# accumulators for d hidden and d weight and one 4096 x 32768 bf16 tile: 4 V H + 4 N H + 256 MiB.
# This design holds the fp32 d weight accumulator less the gradient it becomes (4 V H - e V H, for
# e-byte inputs; its fp32 [N, H] is never needed) beside the tile, so a tile of e V H + 4 N H + 256 MiB
# keeps the extra memory at or below TRL's at every N. ``O(N)`` terms (order, statistics, per-token
# gradients, index vectors) are held back: TILE_RESERVE_PER_TOKEN bytes per token.
TRL_TILE_BYTES = 4096 * 32768 * 2
TILE_RESERVE_PER_TOKEN = 64
TILE_ROWS = 128  # tiles below N tokens are a multiple of this (the matmuls' row tiles)


def default_tile_bytes(n: int, v: int, h: int, elem: int) -> int:
    """The default ``max_tile_bytes`` at ``n`` tokens, a ``[v, h]`` head of ``elem``-byte elements."""
    return elem * v * h + 4 * n * h + TRL_TILE_BYTES - TILE_RESERVE_PER_TOKEN * n


def sharded_tile_rows(h: int, elem: int) -> int:
    """Default tile height with a vocabulary-parallel head: every rank must walk the same chunks,
    and shards may differ in size, so the height may not depend on the shard: ``elem * h / 4`` tokens
    (``4 C V_r <= elem V_r h``, the fp32 tile within the gradient's own size) in multiples of
    ``TILE_ROWS``, at least ``TILE_ROWS``."""
    return max(TILE_ROWS, (elem * h // 4) // TILE_ROWS * TILE_ROWS)


def tile_tokens(n: int, v: int, max_tile_bytes: int) -> int:
    """Tokens per tile ``C`` for a ``[C, v]`` fp32 tile within ``max_tile_bytes``: all ``n`` if they fit;
    else a multiple of ``TILE_ROWS``, the chunks made as even as the budget allows (a small last chunk
    would make its ``d weight`` product memory-bound); below ``TILE_ROWS`` rows (a tiny budget) as many
    rows as fit, at least one."""
    rows = max(1, max_tile_bytes // (4 * max(v, 1)))
    if rows >= n:
        return max(n, 1)
    if rows < TILE_ROWS:
        return rows
    most = rows // TILE_ROWS * TILE_ROWS
    chunks = -(-n // most)
    return -(-(-(-n // chunks)) // TILE_ROWS) * TILE_ROWS  # ceil(n / chunks), rounded up to TILE_ROWS


def pack_valid(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, count)``: token indices, valid ones first in their original order, and how many are valid.

    A stable sort of ``~valid`` on the device: no host sync, whatever the mask.
    """
    order = torch.sort((~valid).to(torch.uint8), stable=True).indices
    return order, valid.sum().reshape(1)


# --- the library matmuls: fp32 products of fp32 or 16-bit operands -----------------------------------

def native_16bit(weight: torch.Tensor) -> bool:
    """16-bit operands straight into the library matmul with an fp32 output (``out_dtype``: CUDA,
    torch >= 2.8); else the matmuls take fp32 operands (an fp32 head, or upcast copies)."""
    return weight.is_cuda and weight.dtype != torch.float32 and hasattr(torch.ops.aten.mm, "dtype")


def mm_operand(x: torch.Tensor, native: bool) -> torch.Tensor:
    """``x`` as the matmuls take it: itself (fp32, or 16-bit with ``native``), else an fp32 copy. The
    head is converted once per call; a 16-bit tile of ``d logits`` once per chunk (the CPU path)."""
    return x if native or x.dtype == torch.float32 else x.float()


def logits_product(h: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
    """``out = h @ w.T``, fp32 ``[C, V]``, for operands from ``mm_operand``."""
    if h.dtype == torch.float32:
        torch.mm(h, w.T, out=out)
    else:
        torch.mm(h, w.T, out_dtype=torch.float32, out=out)


def hidden_product(dl: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``dl @ w`` in ``dtype``, accumulated in fp32 and rounded once (operands from ``mm_operand``)."""
    if dl.dtype == torch.float32 or dtype == dl.dtype:
        return torch.mm(dl, w).to(dtype)
    return torch.mm(dl, w, out_dtype=dtype)


def add_weight_product(acc: torch.Tensor, dl: torch.Tensor, h: torch.Tensor) -> None:
    """``acc += dl.T @ h`` into the fp32 accumulator (operands from ``mm_operand``)."""
    if h.dtype == torch.float32:
        acc.addmm_(dl.T, h)
    else:
        torch.addmm(acc, dl.T, h, out_dtype=torch.float32, out=acc)


# --- the row epilogues ------------------------------------------------------------------------------

@triton.jit
def _tile_stats_kernel(
    tile_ptr, b_ptr, ids_ptr, ok_ptr, m_ptr, s_ptr, u_ptr, zt_ptr,
    V, s_row, temperature,
    HAS_BIAS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One program per tile row: ``(m, s, u, zt)`` of ``z = (tile + bias) / T``; ``(0, 1, 0, 0)`` for a
    row that is not ``ok`` (padding, read nowhere). ``ids`` are local to the shard: ``zt`` is 0 for an
    id outside ``[0, V)``, read only where the shard holds it."""
    r = tl.program_id(0).to(tl.int64)
    ok = tl.load(ok_ptr + r) != 0
    row = tile_ptr + r * s_row
    m, s, u = row_softmax_stats(row, b_ptr, tl.where(ok, V, 0), V, temperature, True, HAS_BIAS, BLOCK_V)
    token = tl.load(ids_ptr + r, mask=ok, other=-1)
    own = ok & (token >= 0) & (token < V)
    at = tl.where(own, token, 0)
    zt = tl.load(row + at, mask=own, other=0.0).to(tl.float32)
    if HAS_BIAS:
        zt += tl.load(b_ptr + at, mask=own, other=0.0).to(tl.float32)
    tl.store(m_ptr + r, m)
    tl.store(s_ptr + r, tl.where(ok, s, 1.0))
    tl.store(u_ptr + r, u)
    tl.store(zt_ptr + r, tl.where(own, zt / temperature, 0.0))


def tile_stats(tile: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor, ok: torch.Tensor,
               temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(m, s, u, zt)`` fp32 ``[C]`` of the ``[C, V]`` fp32 tile (unit column stride), ``ids`` ``[C]``
    local to the shard (-1 or any id outside it: not held here), ``ok`` bool ``[C]``."""
    C, V = tile.shape
    out = [torch.empty(C, dtype=torch.float32, device=tile.device) for _ in range(4)]
    if C:
        bv, warps = block_v(V)
        _tile_stats_kernel[(C,)](tile, tile if bias is None else bias, ids, ok.view(torch.uint8), *out, V,
                                 tile.stride(0), float(temperature), HAS_BIAS=bias is not None, BLOCK_V=bv,
                                 num_warps=warps)
    return tuple(out)


def tile_grad_(tile: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor, ok: torch.Tensor,
               lse: torch.Tensor, entropy: torch.Tensor, g_logp: torch.Tensor, g_entropy: torch.Tensor | None,
               temperature: float, dtype: torch.dtype) -> None:
    """``d logits`` of the ``[C, V]`` fp32 tile written over it, in ``dtype``: fp32 in place, a 16-bit
    dtype into the first half of each row (``grad_view`` reads it). Per row: the global ``lse`` and
    ``entropy``, the upstream ``g_logp`` and ``g_entropy`` (None: no entropy gradient), fp32 ``[C]``;
    rows not ``ok`` are written 0 and not read."""
    C, V = tile.shape
    if not C:
        return
    out = grad_view(tile, dtype)
    bv, warps = block_v(V)
    ok_u8 = ok.view(torch.uint8)
    has_ent = g_entropy is not None
    _logits_bwd_kernel[(C,)](
        tile, ids, lse, entropy if has_ent else lse, g_logp, g_entropy if has_ent else lse, out,
        C, V, 0, tile.stride(0), 0, ids.stride(0), 0, out.stride(0), float(temperature),
        ok_u8, 0, ok_u8.stride(0), lse, lse, lse, 0.0, tile if bias is None else bias,
        HAS_ENTROPY_GRAD=has_ent, BLOCK_V=bv, HAS_MASK=True, HAS_BIAS=bias is not None,
        ALIASED=dtype != torch.float32, num_warps=warps,
    )


def grad_view(tile: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The ``[C, V]`` ``d logits`` that ``tile_grad_`` wrote over ``tile``: the tile itself (fp32), or the
    first half of each fp32 row seen as ``dtype`` (a view: row stride ``2 V`` elements)."""
    if dtype == torch.float32:
        return tile
    C, V = tile.shape
    return tile.view(dtype)[:, :V] if C else tile.new_empty((0, V), dtype=dtype)


def finish_stats(m: torch.Tensor, s: torch.Tensor, u: torch.Tensor, zt: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp, entropy, lse)`` from a token's statistics over the whole vocabulary.

    ``logp = min((zt - m) - log s, 0)`` and ``entropy = log s - u / s``: differences of nearby
    numbers are taken first, never against a rounded ``lse`` (near |z| = 1e4 fp32's spacing is
    1e-3). ``zt <= m`` already holds within one tile; the bound also covers a target logit summed
    across shards.
    """
    log_s = torch.log(s)
    return torch.clamp((zt - m) - log_s, max=0.0), log_s - u / s, m + log_s


def combine_shards(m: torch.Tensor, s: torch.Tensor, u: torch.Tensor, zt: torch.Tensor, big_m: torch.Tensor
                   ) -> torch.Tensor:
    """``[3, C]``: this shard's ``s``, ``u`` rebased on the global max ``big_m``, and ``zt``: their sum over
    the shards is the whole vocabulary's ``(s, u, zt)``."""
    scale = torch.exp(m - big_m)
    return torch.stack([s * scale, (u + s * (m - big_m)) * scale, zt])


# --- the loop ---------------------------------------------------------------------------------------

class TileSteps(NamedTuple):
    """The per-tile steps ``run_chunks`` calls: the raw launches (inside an op), or the ops with the
    collectives of a vocabulary-parallel head (traced by ``torch.compile``).

    ``stats(tile, bias, ids, ok, T) -> (m, s, u, zt)``; ``grad_(tile, bias, ids, ok, lse, entropy,
    g_logp, g_entropy, T, dtype)``; ``combine(m, s, u, zt) -> (m, s, u, zt)`` over the shards (None:
    one shard); ``sum_rows(x)``: a ``d hidden`` chunk summed over the shards (None: one shard).
    """

    stats: Callable = tile_stats
    grad_: Callable = tile_grad_
    combine: Callable | None = None
    sum_rows: Callable | None = None


class Chunks(NamedTuple):
    """What ``run_chunks`` returns: fp32 ``[N]`` ``logp``, ``entropy``, ``lse`` (0, 0, 0 where not
    valid), and the gradients it formed: ``d hidden`` in hidden's shape (fp32 with a group, else its
    dtype), fp32 ``d weight`` ``[V, H]`` and ``d bias`` ``[V]``; empty where not asked for."""

    logp: torch.Tensor
    entropy: torch.Tensor
    lse: torch.Tensor
    d_hidden: torch.Tensor
    d_weight: torch.Tensor
    d_bias: torch.Tensor


def gather_rows(hidden: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of ``hidden`` seen as ``[N, H]``, without copying the rest (``[B, T, H]`` slices of a
    model's hidden states are not viewable as ``[N, H]``)."""
    if hidden.dim() == 2:
        return hidden.index_select(0, idx)
    T = hidden.shape[1]
    return hidden[idx // T, idx % T]


def run_chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    valid: torch.Tensor,
    temperature: float,
    rows: int,
    *,
    upstream: Callable | None = None,
    known: tuple[torch.Tensor, torch.Tensor] | None = None,
    need_hidden: bool = False,
    need_weight: bool = False,
    vocab_start: torch.Tensor | None = None,
    steps: TileSteps = TileSteps(),
) -> Chunks:
    """Walk the valid-first tokens in chunks of ``rows``: the tile, its statistics, and with
    ``upstream`` the gradients (see the module docstring).

    ``hidden`` ``[N, H]`` or ``[B, T, H]``, ``ids`` and ``valid`` ``[N]`` (flattened), ``weight``
    ``[V, H]`` (this rank's rows with ``vocab_start``, a device ``[1]``, and ``steps`` that combine).
    ``upstream(idx, ok, logp, entropy) -> (g_logp, g_entropy or None)``: fp32 ``[C]`` upstream
    gradients of the chunk's tokens (``idx`` their flat positions, ``ok`` which are valid), called
    once its log-probs are known: the loss path forms its gradient there. ``known = (lse,
    entropy)`` ``[N]``: the statistics of an earlier forward; the tiles' are not recomputed (the
    general path's backward). ``need_hidden`` / ``need_weight``: which gradients to form.
    """
    H = hidden.shape[-1]
    N, V = ids.numel(), weight.shape[0]
    dev = hidden.device
    f32 = dict(dtype=torch.float32, device=dev)
    order, count = pack_valid(valid)
    local = ids if vocab_start is None else ids - vocab_start
    logp, entropy, lse = (torch.zeros(N, **f32) for _ in range(3)) if known is None else (
        torch.empty(0, **f32), known[1], known[0])
    grads = upstream is not None and (need_hidden or need_weight)
    sharded = steps.sum_rows is not None
    dh = (torch.empty(hidden.shape, dtype=torch.float32 if sharded else hidden.dtype, device=dev)
          if grads and need_hidden else torch.empty(0, **f32))
    dw = torch.zeros((V, H), **f32) if grads and need_weight else torch.empty(0, **f32)
    db = torch.zeros(V, **f32) if grads and need_weight and bias is not None else torch.empty(0, **f32)
    native = native_16bit(weight)
    w = mm_operand(weight, native)
    tile = torch.empty((min(rows, N), V), **f32)
    zero = torch.zeros((), **f32)
    for c0 in range(0, N, rows):
        c1 = min(c0 + rows, N)
        idx = order[c0:c1]
        ok = torch.arange(c0, c1, device=dev) < count
        h = torch.where(ok[:, None], gather_rows(hidden, idx), torch.zeros((), dtype=hidden.dtype, device=dev))
        t = tile[: c1 - c0]
        h = mm_operand(h, native)
        logits_product(h, w, t)
        ids_c = local.index_select(0, idx)
        if known is None:
            m, s, u, zt = steps.stats(t, bias, ids_c, ok, temperature)
            if steps.combine is not None:
                m, s, u, zt = steps.combine(m, s, u, zt)
            logp_c, ent_c, lse_c = (torch.where(ok, x, zero) for x in finish_stats(m, s, u, zt))
            logp[idx], entropy[idx], lse[idx] = logp_c, ent_c, lse_c
        else:
            ent_c, lse_c = entropy.index_select(0, idx), lse.index_select(0, idx)
            logp_c = None
        if not grads:
            continue
        g_logp, g_entropy = upstream(idx, ok, logp_c, ent_c)
        steps.grad_(t, bias, ids_c, ok, lse_c, ent_c, g_logp, g_entropy, temperature, weight.dtype)
        dl = mm_operand(grad_view(t, weight.dtype), native)
        if need_hidden:
            dh_c = hidden_product(dl, w, torch.float32 if sharded else hidden.dtype)
            dh.view(-1, H)[idx] = steps.sum_rows(dh_c) if sharded else dh_c
        if need_weight:
            add_weight_product(dw, dl, h)
            if bias is not None:
                db += dl.sum(0, dtype=torch.float32)
    return Chunks(logp, entropy, lse, dh, dw, db)
