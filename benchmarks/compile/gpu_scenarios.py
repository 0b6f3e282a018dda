"""The calls whose kernel launches ``gpu_compile.py`` compiles: a covering set of the public API.

Each scenario calls public ``rlloss`` functions with ``backend="triton"`` on small CPU tensors
(every recipe, each aggregation and option, fp32/bf16/fp16, forward and backward). Imported only
in the capture process, where ``TRITON_INTERPRET=1`` is set before triton is first imported.

The shapes are typical of RL fine-tuning (``B`` rows of ``T = 4096`` tokens, a multiple of 16),
plus a short row (``T = 512``), longer ones (``T`` up to 32768: 2 to 32 chunks of 1024 tokens per
row, each a different combine tile) and a ragged length (``T = 1000``, not a multiple of 16: row
strides lose their divisibility, so no vector access can be proved aligned there).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

import rlloss

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared problems.py

from problems import compile_inputs  # noqa: E402

# Shapes. B only enters the kernels as a scalar; T sets the block sizes and the row strides.
B = 8
T = 4096  # typical: a multiple of 16, several 1024-token chunks per row
SHORT_T = 512  # one chunk per row, a smaller block
RAGGED_T = 1000  # not a multiple of 16: the row stride loses its divisibility
CHUNKED_T = (2048, 8192, 16384, 32768)  # 2, 8, 16, 32 chunks per row (T itself gives 4)


def scenarios() -> list[tuple[str, Callable[[], None]]]:
    """(name, thunk) pairs calling the public API with ``backend="triton"``; run in the capture child.

    A covering set, not the full product of every option: each recipe and the all-options
    configurations (the most code, the most registers) in every dtype, then each remaining option
    once in fp32, then other row lengths. Every launch the dispatcher makes for these calls
    (forward and backward) is captured; distinct specialisations are compiled once.
    """
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    f32 = torch.float32
    out: list[tuple[str, Callable[[], None]]] = []

    def add(name: str, fn: Callable[[], None]) -> None:
        out.append((name, fn))

    # policy_loss: forward + backward (what a training step launches)
    def policy(dt, t=T, b=B, grad=True, per_token_adv=False, old=True, ref=False, **kw):
        def run():
            logp, old_logp, adv, mask, ref_logp = compile_inputs(dt, b, t, per_token_adv=per_token_adv)
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
        add(f"policy_loss GMPO {dn}", policy(dt, objective=rlloss.GMPO(), ref=True, beta=0.04,
                                             aggregation="seq_mean_token_mean"))
        add(f"policy_loss GSPO, sequence-level kl_bias_correction {dn}",
            policy(dt, **gspo, ref=True, beta=0.04, kl="k3+", kl_bias_correction=True))
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
    add("policy_loss GMPO per-token adv fp32 T=8192",
        policy(f32, t=8192, b=2, per_token_adv=True, objective=rlloss.GMPO(), aggregation="seq_mean_token_mean"))

    # clipped_surrogate: forward + backward of the per-token loss
    def surrogate(dt, t=T, grad=True, per_token_adv=False, old=True, **kw):
        def run():
            logp, old_logp, adv, mask, _ = compile_inputs(dt, B, t, per_token_adv=per_token_adv)
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
            logp, _, _, _, ref = compile_inputs(dt, B, T)
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
            x, _, _, mask, _ = compile_inputs(dt, B, t)
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
            logp, old_logp, adv, mask, ref_logp = compile_inputs(dt, B, T)
            w = torch.rand((B,) if weights_dim == 1 else (B, T)).to(dt)
            res = rlloss.policy_loss(logp, old_logp, adv, mask, ref_logp=ref_logp, beta=0.04, kl="k3+",
                                     kl_bias_correction=True, token_weights=w, aggregation="token_sum",
                                     backend="triton")
            res.loss.backward()
        return run

    def gmpo_weighted(dt, weights_dim):
        def run():
            logp, old_logp, adv, mask, ref_logp = compile_inputs(dt, B, T, per_token_adv=True)
            w = torch.rand((B,) if weights_dim == 1 else (B, T)).to(dt)
            res = rlloss.policy_loss(logp, old_logp, adv, mask, objective=rlloss.GMPO(), ref_logp=ref_logp, beta=0.04,
                                     kl_bias_correction=True, token_weights=w, aggregation="seq_mean_token_mean",
                                     backend="triton")
            res.loss.backward()
        return run

    add("policy_loss token weights [B,T], k3+, bias correction, token_sum fp32", modified(f32, 2))
    add("policy_loss token weights [B], k3+, bias correction, token_sum bf16", modified(torch.bfloat16, 1))
    add("policy_loss GMPO token weights [B,T], per-token adv, bias correction fp32", gmpo_weighted(f32, 2))
    add("policy_loss GMPO token weights [B], per-token adv, bias correction bf16", gmpo_weighted(torch.bfloat16, 1))
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

    # from hidden states: the tile epilogues (statistics; d logits in place, fp32, or 16-bit into each fp32
    # row's first half) and, on the loss path, policy_loss's per-token kernel on each chunk's gathered
    # inputs; V of 1000 (not a multiple of the blocks), 37 (one small block) and 151936 (Qwen2.5, 4096-wide
    # blocks); H and N odd; tiles of all N tokens and of fewer (a last, partial chunk)
    def hidden_run(dt, v=1000, h=97, bias=True, what="grad", tile=None):
        """``what``: "grad" (log-prob and entropy differentiated), "metric" (the entropy detached), "loss"
        (DAPO: the loss path), "loss+" (an entropy bonus, KL with bias correction, per-token weights and
        advantages), "gspo" (a row statistic: the general path under the loss)."""
        def run():
            gen = torch.Generator().manual_seed(5)
            hidden = torch.randn(3, 7, h, generator=gen).to(dt).requires_grad_(True)
            w = (torch.randn(v, h, generator=gen) / h**0.5).to(dt).requires_grad_(True)
            b = torch.randn(v, generator=gen).to(dt).requires_grad_(True) if bias else None
            ids = torch.randint(0, v, (3, 7), generator=gen)
            mask = torch.rand(3, 7, generator=gen) > 0.2
            budget = None if tile is None else 4 * v * tile
            if what in ("grad", "metric"):
                logp, ent = rlloss.linear_token_logprobs(hidden, w, ids, bias=b, mask=mask, return_entropy=True,
                                                         entropy_grad=what == "grad", max_tile_bytes=budget,
                                                         backend="triton")
                (logp.sum() + (ent.sum() if what == "grad" else 0)).backward()
                return
            old, adv = -torch.rand(3, 7, generator=gen) * 3, torch.randn(3, generator=gen)
            kw = {"level": "sequence"} if what == "gspo" else {}
            if what == "loss+":
                kw = dict(entropy_coef=0.01, beta=0.04, ref_logp=old + 0.1, kl_bias_correction=True,
                          token_weights=torch.rand(3, 7, generator=gen), aggregation="seq_mean_token_mean")
                adv = adv[:, None] * torch.rand(3, 7, generator=gen)
            out = rlloss.policy_loss_from_hidden(hidden, w, ids, old, adv, mask, bias=b, max_tile_bytes=budget,
                                                 backend="triton", **kw)
            out.loss.backward()
        return run

    for dn, dt in dtypes.items():
        for what in ("grad", "metric", "loss", "loss+", "gspo"):
            add(f"from hidden V=1000 H=97 {dn}, {what}", hidden_run(dt, what=what))
        add(f"from hidden V=151936 H=8 {dn}, loss, no bias, tiles of 8", hidden_run(dt, v=151936, h=8, bias=False,
                                                                                     what="loss", tile=8))
        add(f"from hidden V=37 H=5 {dn}, grad, tiles of 5", hidden_run(dt, v=37, h=5, what="grad", tile=5))
    for what in ("grad", "loss"):  # heads without a bias (Qwen, Llama): their own specialisations
        add(f"from hidden bf16, no bias, {what}", hidden_run(torch.bfloat16, bias=False, what=what))
    return out
