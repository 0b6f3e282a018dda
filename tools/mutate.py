"""Mutation check: apply plausible bugs one at a time and see that the tests catch each.

Each mutant replaces one exact piece of source text (it must occur exactly once, so a refactor
that moves the code makes the script fail loudly rather than test nothing), runs the tests that
should catch it, and restores the file, whatever happens. A mutant is *killed* when pytest reports
a failing test (exit status 1); *survived* when the tests pass; *broken* for anything else (an
import or collection error is not a plausible bug).

The tests run with the ``explicit`` hypothesis profile (``tests/conftest.py``): only the
``@example`` cases and pytest's parametrised ones, no drawn example, so a kill never depends on
which hypothesis version pip resolved (``--profile ci`` runs the suite's own profile instead).

Mutants marked ``trainers`` stand for bugs in the TRL and verl integrations: their tests carry the
pytest marker ``trainers`` and need TRL 1.16 and verl 0.9.1, which live in a second environment
(``.ci/run``'s second stage); they run with ``-m trainers`` under the interpreter given by
``--trainers-python`` (default: ``$RLLOSS_TRAINERS_PYTHON``). The others run under the interpreter
that runs this script.

Not part of CI (an hour or more on two cores). Run it when the suite or the code changes:

    TRITON_INTERPRET=1 .venv/bin/python tools/mutate.py --trainers-python .venv-trainers/bin/python
    TRITON_INTERPRET=1 .venv/bin/python tools/mutate.py --list
    TRITON_INTERPRET=1 .venv/bin/python tools/mutate.py eps_swapped where_to_multiply_old
    TRITON_INTERPRET=1 .venv/bin/python tools/mutate.py --skip-trainers       # without the trainers' venv

The list and the last results: tools/MUTATION.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids, -k expressions
    why: str  # the bug it stands for
    trainers: bool = False  # its tests are marked `trainers`: run with -m trainers in the trainers' environment


TRL, VERL = "tests/test_integrations_trl.py", "tests/test_integrations_verl.py"


def T(name: str, path: str, old: str, new: str, tests: tuple[str, ...], why: str) -> Mutant:
    """A mutant of the trainer integrations (its tests run in the trainers' environment)."""
    return Mutant(name, path, old, new, tests, why, trainers=True)


MUTANTS: tuple[Mutant, ...] = (
    # --- aggregation ---------------------------------------------------------------------------
    Mutant("token_mean_ignores_num_tokens", "rlloss/aggregation.py",
           "n_tok = mask.sum() if num_tokens is None else num_tokens", "n_tok = mask.sum()",
           ("tests/test_properties.py", "-k", "microbatches_and"),
           "token_mean normalises by the micro-batch's own token count, not the step's (the split property)"),
    Mutant("token_mean_ignores_num_tokens_partitions", "rlloss/aggregation.py",
           "n_tok = mask.sum() if num_tokens is None else num_tokens", "n_tok = mask.sum()",
           ("tests/test_distributed.py", "-k", "random_partitions"),
           "the same bug, against the random-partition property alone"),
    Mutant("kernel_token_mean_ignores_num_tokens", "kernels/policy_loss.py",
           "    if TOKENS_MODE == 0:\n        n_tok = count", "    if True:\n        n_tok = count",
           ("tests/test_properties.py", "-k", "microbatches_and"),
           "the fused kernel's token_mean ignores num_tokens"),
    Mutant("seq_mean_ignores_num_seqs", "rlloss/aggregation.py",
           "n_seq = per_token.shape[0] if num_seqs is None else num_seqs", "n_seq = per_token.shape[0]",
           ("tests/test_oracles.py", "-k", "policy_loss_matches"),
           "the seq-mean modes divide by the local B, not num_seqs"),
    Mutant("row_mean_over_all_tokens", "rlloss/aggregation.py",
           "row = _safe_div(per_token.sum(-1), mask.sum(-1).to(dtype))",
           "row = _safe_div(per_token.sum(-1), mask.sum().to(dtype))",
           ("tests/test_oracles.py", "-k", "policy_loss_matches"),
           "seq_mean_token_mean divides each row by the batch's token count"),
    # --- masking -------------------------------------------------------------------------------
    Mutant("where_to_multiply_old", "rlloss/surrogates.py",
           "torch.where(mask, old_logp.detach().to(dtype), zero)", "old_logp.detach().to(dtype) * mask",
           ("tests/test_masking.py",),
           "masking old_logp by multiplying: NaN * 0 is NaN"),
    Mutant("where_to_multiply_ref", "rlloss/loss.py",
           "ref = torch.where(mask, ref_logp.detach().to(lp.dtype), zero)", "ref = ref_logp.detach().to(lp.dtype) * mask",
           ("tests/test_masking.py",),
           "masking ref_logp by multiplying (survives k3, whose clamp stops the NaN gradient; not k2)"),
    # --- objectives ----------------------------------------------------------------------------
    Mutant("eps_swapped", "rlloss/objectives.py",
           "torch.clamp(ratio, 1 - self.eps_low, 1 + self.high)", "torch.clamp(ratio, 1 - self.high, 1 + self.eps_low)",
           ("tests/test_oracles.py", "-k", "policy_loss_matches"),
           "eps_low and eps_high swapped in PPO's clip"),
    Mutant("kernel_eps_swapped", "rlloss/_fused.py",
           "(1 - objective.eps_low, 1 + objective.high,", "(1 - objective.high, 1 + objective.eps_low,",
           ("tests/test_oracles.py", "-k", "fused_kernel"),
           "the fused kernel's clip bounds swapped"),
    Mutant("dual_clip_sign", "rlloss/objectives.py",
           "torch.minimum(loss, -self.dual_clip * adv), loss)", "torch.minimum(loss, self.dual_clip * adv), loss)",
           ("tests/test_oracles.py", "-k", "policy_loss_matches"),
           "the dual-clip bound with the wrong sign"),
    Mutant("cispo_weight_not_detached", "rlloss/objectives.py",
           "weight = torch.clamp(ratio, min=self.low, max=self.high).detach()",
           "weight = torch.clamp(ratio, min=self.low, max=self.high)",
           ("tests/test_oracles.py", "-k", "policy_loss_matches"),
           "CISPO's importance weight lets gradient through"),
    Mutant("sapo_taus_swapped", "rlloss/objectives.py",
           "torch.where(adv > 0, torch.full_like(adv, self.tau_pos), torch.full_like(adv, self.tau_neg))",
           "torch.where(adv > 0, torch.full_like(adv, self.tau_neg), torch.full_like(adv, self.tau_pos))",
           ("tests/test_oracles.py", "-k", "policy_loss_matches"),
           "SAPO's temperatures for positive and negative advantages swapped"),
    Mutant("kernel_sapo_grad_without_ratio", "kernels/_common.py",
           "grad = -adv * 4.0 * gate * (1.0 - gate) * ratio * passes_clamp",
           "grad = -adv * 4.0 * gate * (1.0 - gate) * passes_clamp",
           ("tests/test_oracles.py", "-k", "fused_kernel"),
           "the fused SAPO gradient forgets the chain rule through r = exp(d)"),
    Mutant("kernel_dro_gradient_sign", "kernels/_common.py",
           "grad = -(adv - beta * d)", "grad = -(adv + beta * d)",
           ("tests/test_oracles.py", "-k", "fused_kernel"),
           "the fused DRO gradient with the regulariser's sign flipped"),
    Mutant("dppo_kl_bounds_swapped", "rlloss/objectives.py",
           "ok_pos, ok_neg = (b <= self.high) | (p <= q), (b <= self.low) | (p >= q)",
           "ok_pos, ok_neg = (b <= self.low) | (p <= q), (b <= self.high) | (p >= q)",
           ("tests/test_oracles.py", "-k", "policy_loss_matches"),
           "DPPO-KL's low and high bounds swapped"),
    Mutant("vespo_mean_not_sum", "rlloss/objectives.py",
           "torch.where(mask, dc, torch.zeros_like(dc)).sum(-1, keepdim=True), LOG_OF_FLOOR",
           "torch.where(mask, dc, torch.zeros_like(dc)).mean(-1, keepdim=True), LOG_OF_FLOOR",
           ("tests/test_oracles.py", "-k", "policy_loss_matches"),
           "VESPO's row log-weight as a mean over T instead of a sum"),
    Mutant("gmpo_without_sign", "rlloss/objectives.py",
           "dm = s * torch.minimum(s * dc, s * dl)", "dm = torch.minimum(dc, dl)",
           ("tests/test_oracles.py", "-k", "policy_loss_matches"),
           "GMPO clips the same side whatever the advantage's sign"),
    Mutant("kl_cov_smallest_covariance", "rlloss/objectives.py",
           "top = torch.topk(cov.flatten(), k).indices", "top = torch.topk(-cov.flatten(), k).indices",
           ("tests/test_oracles.py", "-k", "policy_loss_matches"),
           "KL-Cov penalises the tokens of smallest covariance"),
    # --- KL --------------------------------------------------------------------------------------
    Mutant("k3_direction", "rlloss/kl.py",
           "x = torch.clamp(ref_logp - logp, -KL_INPUT_CLAMP, KL_INPUT_CLAMP)",
           "x = torch.clamp(logp - ref_logp, -KL_INPUT_CLAMP, KL_INPUT_CLAMP)",
           ("tests/test_oracles.py", "-k", "policy_loss_matches"),
           "k3 of the reversed log-ratio"),
    Mutant("k2_without_half", "rlloss/kl.py",
           "return (logp - ref_logp) ** 2 / 2", "return (logp - ref_logp) ** 2",
           ("tests/test_oracles.py", "-k", "policy_loss_matches"),
           "k2 without its 1/2"),
    Mutant("bias_correction_detached", "rlloss/loss.py",
           "    return torch.exp(torch.clamp(d, -max_log_ratio, max_log_ratio))",
           "    return torch.exp(torch.clamp(d, -max_log_ratio, max_log_ratio)).detach()",
           ("tests/test_oracles.py", "-k", "policy_loss_matches"),
           "kl_bias_correction's ratio detached (SPEC: the gradient flows through it)"),
    Mutant("token_weights_scale_kl", "rlloss/loss.py",
           "        if weights is not None:\n            loss = loss * weights\n"
           "        if kl_value is not None and beta != 0:\n            loss = loss + beta * kl_value\n",
           "        if kl_value is not None and beta != 0:\n            loss = loss + beta * kl_value\n"
           "        if weights is not None:\n            loss = loss * weights\n",
           ("tests/test_oracles.py", "-k", "policy_loss_matches"),
           "token weights multiply the KL term too"),
    # --- advantages ------------------------------------------------------------------------------
    Mutant("group_std_biased", "rlloss/advantages.py",
           "var = torch.where(count > 1, sq / (count - 1).clamp(min=1), torch.zeros_like(sq))",
           "var = torch.where(count > 1, sq / count, torch.zeros_like(sq))",
           ("tests/test_oracles.py", "-k", "group_advantages"),
           "the biased (n) group std instead of torch.std's n-1"),
    Mutant("singleton_keep_subtracts_itself", "rlloss/advantages.py",
           "    b = torch.where(alone, torch.zeros_like(b), b)\n", "",
           ("tests/test_oracles.py", "-k", "group_advantages"),
           "singleton='keep' subtracts the sample's own reward as its baseline (advantage 0)"),
    Mutant("passk_runner_up_floor_zero", "rlloss/advantages.py",
           "torch.where(is_best, torch.full_like(s, -math.inf), s)", "torch.where(is_best, torch.zeros_like(s), s)",
           ("tests/test_oracles.py", "-k", "passk"),
           "pass@k hides the best behind 0 instead of -inf: with negative scores the runner-up becomes 0"),
    Mutant("passk_ties_share_the_gap", "rlloss/advantages.py",
           "alone_best = is_best & (n_best[index] == 1)\n    adv = torch.where(alone_best, gap[index], zero)",
           "alone_best = is_best & (n_best[index] == 1)\n    adv = torch.where(is_best, (best - runner_up)[index], zero)",
           ("tests/test_oracles.py", "-k", "passk"),
           "pass@k: samples tied for the best each get best - runner-up instead of 0"),
    # === added for issue 26: every public module, function, kernel and dispatch; the trainers' options ====
    # --- policy_loss: aggregation, counts, dp_size, metrics --------------------------------------
    Mutant("dp_size_not_applied", "rlloss/aggregation.py",
           "        loss = per_token.sum()\n    return loss * dp_size", "        loss = per_token.sum()\n    return loss",
           ("tests/test_oracles.py", "-k", "policy_loss_matches_the_oracle_fixed"),
           "policy_loss ignores dp_size (DDP's average over ranks is not undone)"),
    Mutant("kernel_dp_size_not_applied", "kernels/policy_loss.py",
           "    tl.store(loss_ptr, loss * dp_size)", "    tl.store(loss_ptr, loss)",
           ("tests/test_known_values.py", "-k", "aggregation_on_2x3"),
           "the fused policy_loss's value ignores dp_size"),
    Mutant("kernel_constant_ignores_max_tokens", "kernels/policy_loss.py",
           "        factor = _safe_div(1.0, n_seq * max_tokens)", "        factor = _safe_div(1.0, n_seq)",
           ("tests/test_known_values.py", "-k", "aggregation_on_2x3"),
           "the fused Dr. GRPO gradient forgets max_tokens (the loss keeps it)"),
    Mutant("metric_clip_high_sign", "rlloss/objectives.py",
           '"clip_high": (ratio > 1 + self.high) & (adv > 0)}', '"clip_high": (ratio > 1 + self.high) & (adv < 0)}',
           ("tests/test_known_values.py", "-k", "metrics_count"),
           "the clip_high metric counts the negative advantages"),
    Mutant("gmpo_row_weights_ignored", "rlloss/loss.py",
           "        if weights.dim() == 1:\n            row = row * weights\n",
           "        if weights.dim() == 1:\n            row = row\n",
           ("tests/test_oracles.py", "-k", "policy_loss_matches_the_oracle_fixed"),
           "GMPO's per-row token weights dropped"),
    Mutant("empty_batch_does_not_warn", "rlloss/_validate.py",
           "    if count == 0:\n", "    if count == -1:\n",
           ("tests/test_pitfalls.py", "-k", "warn"),
           "an empty step issues no EmptyBatchWarning (a loss of 0 that looks like a quiet step)"),
    Mutant("suspicious_input_does_not_warn", "rlloss/_validate.py",
           "    bad, above = int(nonfinite.item()), int(positive.item())",
           "    bad, above = 0, int(positive.item())",
           ("tests/test_pitfalls.py", "-k", "suspicious"),
           "NaN or inf at valid positions issue no SuspiciousInputWarning"),
    # --- masked_mean ------------------------------------------------------------------------------
    Mutant("masked_mean_counts_every_entry", "rlloss/aggregation.py",
           "        count = mask.sum() if dim is None else mask.sum(dim)",
           "        count = torch.ones_like(mask).sum() if dim is None else torch.ones_like(mask).sum(dim)",
           ("tests/test_known_values.py", "-k", "masked_mean"),
           "masked_mean divides by every entry, masked ones included"),
    Mutant("kernel_masked_mean_normalizer_ignored", "kernels/aggregation.py",
           "        den = norm_value + tl.zeros((), tl.float32)", "        den = count",
           ("tests/test_known_values.py", "-k", "masked_mean"),
           "the fused masked_mean ignores a number normalizer"),
    Mutant("kernel_masked_mean_grad_ignores_mask", "kernels/aggregation.py",
           "    grad = tl.where(valid, scale + tl.zeros((BLOCK,), tl.float32), 0.0)",
           "    grad = scale + tl.zeros((BLOCK,), tl.float32)",
           ("tests/test_known_values.py", "-k", "masked_mean"),
           "the fused masked_mean's backward writes gradient at masked positions"),
    # --- KL -----------------------------------------------------------------------------------------
    Mutant("straight_through_keeps_base_gradient", "rlloss/kl.py",
           "        return k2 - k2.detach() + _kl_terms(logp, ref_logp, kind[:-1]).detach()",
           "        return _kl_terms(logp, ref_logp, kind[:-1])",
           ("tests/test_oracles.py", "-k", "policy_loss_matches_the_oracle_fixed"),
           "the k1+/k3+/abs+ kinds keep their own gradient instead of k2's (verl's straight-through)"),
    Mutant("abs_kl_signed", "rlloss/kl.py",
           "        return (logp - ref_logp).abs()", "        return logp - ref_logp",
           ("tests/test_oracles.py", "-k", "policy_loss_matches_the_oracle_fixed"),
           "the abs KL kind without its absolute value"),
    Mutant("kernel_k2_gradient_doubled", "kernels/_common.py",
           "        value = diff * diff / 2\n        grad = diff\n", "        value = diff * diff / 2\n        grad = 2 * diff\n",
           ("tests/test_oracles.py", "-k", "fused_kernel_matches_the_oracle_fixed"),
           "the fused k2 gradient forgets the 1/2"),
    Mutant("kernel_k3_direction", "kernels/_common.py",
           "    x_raw = ref - logp", "    x_raw = logp - ref",
           ("tests/test_known_values.py", "-k", "k3"),
           "k3_kl's kernel on the reversed log-ratio"),
    # --- objectives, per-token functions and their dispatch ------------------------------------------
    Mutant("gspo_row_mean_over_T", "rlloss/objectives.py",
           "            s = (d.detach().sum(-1) / _row_count(mask, d.dtype).clamp(min=1))[:, None]",
           "            s = (d.detach().sum(-1) / d.shape[-1])[:, None]",
           ("tests/test_oracles.py", "-k", "policy_loss_matches_the_oracle_fixed"),
           "GSPO's sequence log-ratio averaged over the padded length, not the row's tokens"),
    Mutant("delta_ignored", "rlloss/objectives.py",
           "        unclipped = ratio if self.delta is None else torch.clamp(ratio, max=self.delta)",
           "        unclipped = ratio",
           ("tests/test_oracles.py", "-k", "policy_loss_matches_the_oracle_fixed"),
           "PPO's delta (INTELLECT-2's cap of the unclipped ratio) ignored"),
    Mutant("reinforce_uses_the_ratio", "rlloss/objectives.py",
           "        return -adv * logp, ratio, {}", "        return -adv * ratio, ratio, {}",
           ("tests/test_oracles.py", "-k", "surrogate_functions"),
           "REINFORCE's loss -A*r instead of -A*logp"),
    Mutant("dro_penalty_without_half", "rlloss/objectives.py",
           "        return -(adv * logp - self.beta / 2 * d**2)", "        return -(adv * logp - self.beta * d**2)",
           ("tests/test_oracles.py", "-k", "policy_loss_matches_the_oracle_fixed"),
           "DRO's quadratic penalty without its 1/2"),
    Mutant("clip_cov_no_upper_bound", "rlloss/objectives.py",
           "(cov > self.cov_low) & (cov < self.cov_high)", "(cov > self.cov_low)",
           ("tests/test_oracles.py", "-k", "policy_loss_matches_the_oracle_fixed"),
           "Clip-Cov's candidates not bounded above by cov_high"),
    Mutant("clipped_surrogate_drops_eps_high", "rlloss/surrogates.py",
           "    objective = PPO(eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, delta=delta, level=level)",
           "    objective = PPO(eps_low=eps_low, eps_high=None, dual_clip=dual_clip, delta=delta, level=level)",
           ("tests/test_oracles.py", "-k", "surrogate_functions"),
           "clipped_surrogate builds PPO without its eps_high"),
    Mutant("cispo_surrogate_drops_low", "rlloss/surrogates.py",
           "    objective = CISPO(low=low, high=high)", "    objective = CISPO(low=None, high=high)",
           ("tests/test_oracles.py", "-k", "surrogate_functions"),
           "cispo_surrogate loses its lower bound"),
    Mutant("sapo_surrogate_one_temperature", "rlloss/surrogates.py",
           "    objective = SAPO(tau_pos=tau_pos, tau_neg=tau_neg)", "    objective = SAPO(tau_pos=tau_pos, tau_neg=tau_pos)",
           ("tests/test_oracles.py", "-k", "surrogate_functions"),
           "sapo_surrogate uses tau_pos for negative advantages too"),
    Mutant("dppo_surrogate_default_cap", "rlloss/surrogates.py",
           "    objective = DPPO(divergence=divergence, low=low, high=high, weight_cap=weight_cap)",
           "    objective = DPPO(divergence=divergence, low=low, high=high)",
           ("tests/test_oracles.py", "-k", "surrogate_functions"),
           "dppo_surrogate ignores weight_cap"),
    Mutant("dro_surrogate_beta_doubled", "rlloss/surrogates.py",
           "    return _dispatch_surrogate(DRO(beta=beta),", "    return _dispatch_surrogate(DRO(beta=2 * beta),",
           ("tests/test_oracles.py", "-k", "surrogate_functions"),
           "dro_surrogate passes the wrong beta"),
    Mutant("vespo_surrogate_k_swapped", "rlloss/surrogates.py",
           "    objective = VESPO(k_pos=k_pos, lam_pos=lam_pos, k_neg=k_neg, lam_neg=lam_neg)",
           "    objective = VESPO(k_pos=k_neg, lam_pos=lam_pos, k_neg=k_pos, lam_neg=lam_neg)",
           ("tests/test_oracles.py", "-k", "surrogate_functions"),
           "vespo_surrogate swaps k_pos and k_neg"),
    Mutant("gmpo_surrogate_bounds_swapped", "rlloss/surrogates.py",
           "    objective = GMPO(log_clip_low=log_clip_low, log_clip_high=log_clip_high)",
           "    objective = GMPO(log_clip_low=log_clip_high, log_clip_high=log_clip_low)",
           ("tests/test_oracles.py", "-k", "surrogate_functions"),
           "gmpo_surrogate swaps its log-space bounds"),
    Mutant("kl_cov_surrogate_default_coef", "rlloss/surrogates.py",
           "    objective = KLCov(ratio=ratio, coef=coef)", "    objective = KLCov(ratio=ratio)",
           ("tests/test_oracles.py", "-k", "surrogate_functions"),
           "kl_cov_surrogate ignores coef"),
    Mutant("clip_cov_surrogate_drops_eps_high", "rlloss/surrogates.py",
           "eps_low=eps_low, eps_high=eps_high, seed=seed)", "eps_low=eps_low, eps_high=None, seed=seed)",
           ("tests/test_oracles.py", "-k", "surrogate_functions"),
           "clip_cov_surrogate ignores eps_high"),
    Mutant("kernel_dual_clip_ignored", "kernels/_common.py",
           "        if DUAL_CLIP:\n            bound = -dual_clip * adv", "        if False:\n            bound = -dual_clip * adv",
           ("tests/test_oracles.py", "-k", "surrogate_functions and triton"),
           "the fused PPO ignores the dual clip"),
    Mutant("kernel_vespo_parameters_by_sign", "kernels/_common.py",
           "        positive = adv >= 0\n        k = tl.where(positive, k_pos, k_neg)",
           "        positive = adv >= 0\n        k = tl.where(positive, k_neg, k_pos)",
           ("tests/test_oracles.py", "-k", "fused_kernel_matches_the_oracle_fixed"),
           "the fused VESPO takes k_neg for positive advantages (its row clamp to [log 1e-8, 20] was tried "
           "first: equivalent, phi is below 1e-14 on both sides of either bound)"),
    Mutant("fused_cispo_bounds_swapped", "rlloss/_fused.py",
           "        return (args(\"cispo\", (objective.low or 0.0, objective.high or 0.0),",
           "        return (args(\"cispo\", (objective.high or 0.0, objective.low or 0.0),",
           ("tests/test_oracles.py", "-k", "surrogate_functions and triton"),
           "the dispatch passes CISPO's bounds to the kernel in the wrong order"),
    Mutant("fused_ppo_delta_flag_lost", "rlloss/_fused.py",
           "(objective.dual_clip is not None, objective.delta is not None),",
           "(objective.dual_clip is not None, False),",
           ("tests/test_oracles.py", "-k", "fused_kernel_matches_the_oracle_fixed"),
           "the dispatch never tells the kernel that PPO has a delta"),
    Mutant("fused_counts_ignored", "rlloss/_fused.py",
           "    return None, -1.0 if value is None else float(value)", "    return None, -1.0",
           ("tests/test_known_values.py", "-k", "aggregation_on_2x3"),
           "the dispatch drops a count given as a number (num_tokens=14 becomes the local count)"),
    # --- advantages -----------------------------------------------------------------------------------
    Mutant("batch_std_biased", "rlloss/advantages.py",
           "        var_all = ((r - mean_all) ** 2).sum() / max(n - 1, 1)", "        var_all = ((r - mean_all) ** 2).sum() / n",
           ("tests/test_oracles.py", "-k", "group_advantages_match_the_oracle_fixed"),
           "scale='batch' with the biased std of all rewards"),
    Mutant("loo_over_the_whole_group", "rlloss/advantages.py",
           "        b = (s_i - r) / (n_i - 1).clamp(min=1)", "        b = s_i / n_i",
           ("tests/test_oracles.py", "-k", "group_advantages_match_the_oracle_fixed"),
           "RLOO's baseline includes the sample itself"),
    Mutant("kernel_group_eps_outside", "kernels/advantages.py",
           "        return tl.where(alone, 1.0, std + eps)", "        return tl.where(alone, 1.0, std)",
           ("tests/test_oracles.py", "-k", "group_advantages_match_the_oracle_fixed"),
           "the fused group advantages forget eps in the denominator"),
    Mutant("kernel_group_loo_divides_by_n", "kernels/advantages.py",
           "b = tl.math.div_rn(tl.load(stats_ptr + K + g, mask=keep, other=0.0) - r, tl.maximum(n - 1.0, 1.0))",
           "b = tl.math.div_rn(tl.load(stats_ptr + K + g, mask=keep, other=0.0) - r, tl.maximum(n, 1.0))",
           ("tests/test_oracles.py", "-k", "group_advantages_match_the_oracle_fixed"),
           "the fused leave-one-out baseline divides by n, not n - 1"),
    Mutant("gpg_counts_positive_scores", "rlloss/advantages.py",
           "    nonzero = (s != 0).sum().to(s.dtype)", "    nonzero = (s > 0).sum().to(s.dtype)",
           ("tests/test_estimators.py", "-k", "gpg"),
           "GPG's alpha counts only the positive scores (every test score was >= 0)"),
    Mutant("opo_unweighted_baseline", "rlloss/advantages.py",
           "    num = group_sum(n_tok * s, index, k)[index]\n    den = group_sum(n_tok, index, k)[index]",
           "    num = group_sum(s, index, k)[index]\n    den = group_sum(torch.ones_like(n_tok), index, k)[index]",
           ("tests/test_estimators.py", "-k", "opo"),
           "OPO's baseline unweighted by the rows' lengths"),
    Mutant("centered_scores_keep_gives_zero", "rlloss/advantages.py",
           '    return torch.where(alone, s if singleton == "keep" else torch.zeros_like(s), centered)',
           '    return torch.where(alone, torch.zeros_like(s), centered)',
           ("tests/test_estimators.py", "-k", "singletons"),
           "singleton='keep' gives 0 in REINFORCE++-baseline and GPG"),
    Mutant("gdpo_weights_ignored", "rlloss/advantages.py",
           "        per_reward = per_reward * weights.to(s.dtype)[:, None]", "        per_reward = per_reward",
           ("tests/test_estimators.py", "-k", "gdpo"),
           "GDPO ignores the reward weights"),
    Mutant("gdpo_std_biased", "rlloss/advantages.py",
           "    var = torch.where(count > 1, group_sum((dev * dev).T, index, k).T / (count - 1).clamp(min=1), zero)",
           "    var = torch.where(count > 1, group_sum((dev * dev).T, index, k).T / count, zero)",
           ("tests/test_estimators.py", "-k", "gdpo"),
           "GDPO's per-reward group std biased"),
    Mutant("reinforce_pp_baseline_not_whitened", "rlloss/advantages.py",
           "    return _whiten_torch(centered[:, None].expand(mask.shape), mask)",
           "    return torch.where(mask, centered[:, None].expand(mask.shape), torch.zeros_like(centered)[:, None])",
           ("tests/test_estimators.py", "-k", "reinforce_pp_baseline"),
           "REINFORCE++-baseline not whitened over the batch"),
    # --- returns and token-level estimators -----------------------------------------------------------
    Mutant("whiten_biased_variance", "rlloss/returns.py",
           "    var = torch.where(n >= 2, (dev * dev).sum() / (n - 1).clamp(min=1), zero)",
           "    var = torch.where(n >= 2, (dev * dev).sum() / n.clamp(min=1), zero)",
           ("tests/test_estimators.py", "-k", "whiten"),
           "whiten with the biased (n) variance, not verl's unbiased one"),
    Mutant("returns_discount_masked_positions", "rlloss/returns.py",
           "        a = torch.where(mask, torch.full((), gamma, dtype=dtype, device=b.device), torch.ones((), dtype=dtype,",
           "        a = torch.where(mask, torch.full((), gamma, dtype=dtype, device=b.device), torch.full((), gamma, dtype=dtype,",
           ("tests/test_estimators.py", "-k", "discounted_returns or reinforce_pp_by_hand"),
           "discounted returns discount across masked positions too"),
    Mutant("reinforce_pp_gamma_ignored", "rlloss/returns.py",
           "    return _whiten_torch(_discounted_returns_torch(token_rewards, mask, float(gamma)), mask)",
           "    return _whiten_torch(_discounted_returns_torch(token_rewards, mask, 1.0), mask)",
           ("tests/test_estimators.py", "-k", "reinforce_pp_by_hand"),
           "reinforce_pp_advantages ignores gamma"),
    Mutant("remax_baseline_added", "rlloss/returns.py",
           "    return torch.where(mask, returns - b[:, None],", "    return torch.where(mask, returns + b[:, None],",
           ("tests/test_estimators.py", "-k", "remax"),
           "ReMax adds the greedy baseline instead of subtracting it"),
    Mutant("optimal_baseline_weights_without_is", "rlloss/returns.py",
           "        w = w * is_weights.to(dtype) ** 2", "        w = w * is_weights.to(dtype)",
           ("tests/test_estimators.py", "-k", "optimal_token_baseline"),
           "the optimal token baseline weighs by the IS weights, not their square"),
    Mutant("optimal_baseline_zero_tail_at_longest", "rlloss/returns.py",
           "        tail = unique[:, None] & (positions[None, :] >= second[index][:, None])",
           "        tail = unique[:, None] & (positions[None, :] > second[index][:, None])",
           ("tests/test_estimators.py", "-k", "optimal_token_baseline"),
           "handle_zero_tail starts one position late"),
    Mutant("passk_scale_ignored", "rlloss/advantages.py",
           '    if scale == "group":\n        gap = gap / (std + eps)', '    if scale == "none":\n        gap = gap / (std + eps)',
           ("tests/test_oracles.py", "-k", "passk_advantages_match_the_oracle_fixed"),
           "pass@k divides by the group std with scale='none' and not with 'group'"),
    # --- shaping ----------------------------------------------------------------------------------------
    Mutant("overlong_ramp_without_factor", "rlloss/shaping.py",
           "    ramp = factor * (start - length) / cache_len", "    ramp = (start - length) / cache_len",
           ("tests/test_known_values.py", "-k", "soft_overlong"),
           "the soft overlong penalty's ramp ignores factor"),
    Mutant("kernel_overlong_ramp_sign", "kernels/shaping.py",
           "    ramp = tl.math.div_rn(factor * (start - length), cache_len)",
           "    ramp = tl.math.div_rn(factor * (length - start), cache_len)",
           ("tests/test_known_values.py", "-k", "soft_overlong"),
           "the fused penalty's ramp a bonus (its free zone made strict was tried first: equivalent, the "
           "penalty is continuous at both ends)"),
    Mutant("dynamic_sampling_keeps_equal_groups", "rlloss/shaping.py",
           "    return (hi > lo)[index]", "    return (hi >= lo)[index]",
           ("tests/test_known_values.py", "-k", "dynamic_sampling"),
           "dynamic sampling keeps all-equal groups"),
    Mutant("kernel_dynamic_sampling_keeps_equal_groups", "kernels/shaping.py",
           "    mixed = tl.max(hi, axis=1) > tl.min(lo, axis=1)", "    mixed = tl.max(hi, axis=1) >= tl.min(lo, axis=1)",
           ("tests/test_known_values.py", "-k", "dynamic_sampling"),
           "the fused dynamic sampling keeps all-equal groups"),
    # --- corrections ------------------------------------------------------------------------------------
    Mutant("rejection_seq_mean_over_T", "rlloss/corrections.py",
           "stat = torch.where(mask, stat, zero).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1).to(dtype)",
           "stat = torch.where(mask, stat, zero).sum(-1, keepdim=True) / mask.shape[-1]",
           ("tests/test_corrections.py", "-k", "rejection"),
           "rejection by sequence-mean divergence divides by the padded length (a partly masked row)"),
    Mutant("rejection_k1_low_default", "rlloss/corrections.py",
           "        lo = 1.0 / high if low is None else low", "        lo = 0.0 if low is None else low",
           ("tests/test_corrections.py", "-k", "rejection"),
           "k1 rejection without its symmetric lower bound 1/high"),
    Mutant("importance_weights_sequence_mean", "rlloss/corrections.py",
           "        x = x.sum(-1, keepdim=True)", "        x = x.mean(-1, keepdim=True)",
           ("tests/test_corrections.py", "-k", "importance_weights"),
           "sequence-level IS weights from the mean log-ratio, not the sum"),
    Mutant("importance_weights_mask_mode_exclusive", "rlloss/corrections.py",
           "            keep = keep & (w <= high)", "            keep = keep & (w < high)",
           ("tests/test_corrections.py", "-k", "importance_weights"),
           "IcePop's mask mode drops a weight exactly at the upper bound"),
    Mutant("importance_weights_normalize_over_all", "rlloss/corrections.py",
           "            count = mask.sum().to(dtype)", "            count = torch.tensor(mask.numel(), dtype=dtype)",
           ("tests/test_corrections.py", "-k", "importance_weights"),
           "normalize divides by every position, masked ones included"),
    Mutant("off_policy_mask_keeps_only_positive", "rlloss/corrections.py",
           "    return (adv.detach() >= 0) | (kl <= threshold)", "    return (adv.detach() > 0) | (kl <= threshold)",
           ("tests/test_corrections.py", "-k", "off_policy"),
           "the off-policy mask tests rows with A = 0"),
    Mutant("off_policy_mask_sign", "rlloss/corrections.py",
           "    term = sampling_logp.detach().to(dtype) - logp.detach().to(dtype)",
           "    term = logp.detach().to(dtype) - sampling_logp.detach().to(dtype)",
           ("tests/test_corrections.py", "-k", "off_policy"),
           "the off-policy mask's divergence with the wrong sign"),
    Mutant("top_entropy_lowest_fraction", "rlloss/corrections.py",
           "    threshold = _masked_quantile(e, mask, 1.0 - fraction)", "    threshold = _masked_quantile(e, mask, fraction)",
           ("tests/test_corrections.py", "-k", "top_entropy"),
           "the top-entropy mask keeps the tokens above the fraction quantile, not 1 - fraction"),
    # --- rlloss.distributed -------------------------------------------------------------------------------
    Mutant("step_counts_count_empty_rows_ignored", "rlloss/distributed.py",
           "    if count_empty_rows:\n", "    if True:\n",
           ("tests/test_distributed.py", "-k", "random_partitions_give_the_full_batch_fixed"),
           "step_counts counts empty rows even with count_empty_rows=False (verl's seq-mean modes)"),
    Mutant("step_counts_kwargs_without_dp_size", "rlloss/distributed.py",
           '        return {"num_tokens": self.num_tokens, "num_seqs": self.num_seqs, "dp_size": self.dp_size}',
           '        return {"num_tokens": self.num_tokens, "num_seqs": self.num_seqs}',
           ("tests/test_distributed.py", "-k", "random_partitions_give_the_full_batch_fixed"),
           "StepCounts.kwargs() leaves out dp_size"),
    Mutant("global_top_entropy_local_quantile", "rlloss/_distributed_entropy.py",
           "    threshold = _masked_quantile(values, valid, 1.0 - fraction)\n    return mask & (e >= threshold)",
           "    threshold = _masked_quantile(e, mask, 1.0 - fraction)\n    return mask & (e >= threshold)",
           ("tests/test_corrections.py", "-k", "global_top_entropy"),
           "the global top-entropy mask takes each rank's own quantile"),
    # --- recipes ------------------------------------------------------------------------------------------
    Mutant("recipe_dapo_eps_high", "rlloss/recipes.py",
           "    eps_low=0.2, eps_high=0.28, aggregation=\"token_mean\", beta=0.0,",
           "    eps_low=0.2, eps_high=0.2, aggregation=\"token_mean\", beta=0.0,",
           ("tests/test_recipes.py",),
           "DAPO's clip-higher 0.28 lost"),
    Mutant("recipe_loss_drops_level", "rlloss/recipes.py",
           '                "beta": self.beta, "level": self.level}', '                "beta": self.beta}',
           ("tests/test_recipes.py",),
           "Recipe.loss runs GSPO at token level"),
    Mutant("recipe_advantages_drop_scale", "rlloss/recipes.py",
           '        return {"baseline": self.baseline, "scale": self.scale}', '        return {"baseline": self.baseline}',
           ("tests/test_recipes.py", "tests/test_pitfalls.py", "-k", "recipe or Recipe or preset"),
           "Recipe.advantages ignores the recipe's scale (Dr. GRPO normalised by the std)"),
    # --- rlloss.audit --------------------------------------------------------------------------------------
    Mutant("audit_scale_not_least_squares", "rlloss/audit/measure.py",
           "    scale = float((g * c).sum()) / cc if cc > 0 else 0.0", "    scale = float((g * c).sum()) / math.sqrt(cc) if cc > 0 else 0.0",
           ("tests/test_audit.py",),
           "the audit's scale is not the least-squares fit"),
    Mutant("audit_split_invariance_not_checked", "rlloss/audit/measure.py",
           "        split_invariant=split_error <= SPLIT_TOLERANCE,", "        split_invariant=True,",
           ("tests/test_audit.py",),
           "the audit calls every loss split-invariant"),
    Mutant("audit_token_weight_sign", "rlloss/audit/measure.py",
           "        weight = float(grad[row][batch.mask[row]].mean()) / -a",
           "        weight = float(grad[row][batch.mask[row]].mean()) / a",
           ("tests/test_audit.py",),
           "the audit's token weights with the wrong sign"),
    Mutant("audit_ranks_not_averaged", "rlloss/audit/measure.py",
           "        loss += piece_loss / dp_size\n        grad[rows] += piece_grad.to(grad.dtype) / dp_size",
           "        loss += piece_loss\n        grad[rows] += piece_grad.to(grad.dtype)",
           ("tests/test_audit.py",),
           "the audit sums the ranks' gradients instead of averaging them as DDP"),
    # --- token log-probs from logits, the loss from logits, their kernels -----------------------------------
    Mutant("entropy_shift_dropped", "kernels/logits.py",
           "            sz = (sz + shift) * rescale +", "            sz = sz * rescale +",
           ("tests/test_logits_fused.py", "-k", "later_chunk"),
           "the online entropy sum not moved onto a new maximum found in a later vocabulary chunk"),
    Mutant("logits_reference_temperature_ignored", "rlloss/logits.py",
           "    z = logits.to(dtype) / temperature", "    z = logits.to(dtype)",
           ("tests/test_logits.py", "-k", "agrees_with_float64"),
           "token_logprobs' reference ignores the temperature"),
    Mutant("logits_bwd_entropy_grad_sign", "kernels/logits.py",
           "            dz -= tl.where(p > 0, g_ent * p * (z - mean_z), 0.0)",
           "            dz += tl.where(p > 0, g_ent * p * (z - mean_z), 0.0)",
           ("tests/test_logits.py", "-k", "triton_matches_reference"),
           "the entropy's gradient through the logits with the wrong sign"),
    Mutant("ids_check_misses_v", "kernels/logits.py",
           "        bad = valid & ((x < 0) | (x >= V))", "        bad = valid & ((x < 0) | (x > V))",
           ("tests/test_logits_fused.py", "-k", "outside_the_vocabulary"),
           "the kernel's id check lets id = V through (a read past the row)"),
    Mutant("from_logits_entropy_bonus_ignores_dp_size", "rlloss/logits.py",
           '                                                dp_size=loss_options.get("dp_size", 1), **counts)',
           '                                                dp_size=1, **counts)',
           ("tests/test_logits.py", "-k", "entropy_bonus_with_counts"),
           "the entropy bonus from logits not multiplied by dp_size like the loss"),
    Mutant("from_logits_entropy_bonus_local_counts", "rlloss/logits.py",
           '        counts = {k: loss_options.get(k) for k in ("max_tokens", "num_tokens", "num_seqs")}',
           '        counts = {k: loss_options.get(k) for k in ("max_tokens",)}',
           ("tests/test_logits.py", "-k", "entropy_bonus_with_counts"),
           "the entropy bonus from logits normalised by the local counts, not the step's"),
    Mutant("kernel_entropy_bonus_sign", "kernels/policy_loss.py",
           "        loss = loss - entropy_coef * ent", "        loss = loss + entropy_coef * ent",
           ("tests/test_logits.py", "-k", "entropy_bonus_with_counts"),
           "the fused loss adds the entropy instead of subtracting the bonus"),
    Mutant("kernel_entropy_bonus_grad_unscaled", "kernels/logits.py",
           "        g_ent = tl.where(valid, -entropy_coef * scale, 0.0)",
           "        g_ent = tl.where(valid, -entropy_coef * tl.load(grad_out_ptr).to(tl.float32), 0.0)",
           ("tests/test_logits.py", "-k", "entropy_bonus_with_counts"),
           "the fused from-logits backward's entropy term without the aggregation's per-token weight"),
    # --- the loss from hidden states: tiles, bias, temperature, the loss path ------------------------------
    Mutant("d_logits_temperature_twice", "kernels/logits.py",
           "        tl.store(out + offs, (dz / temperature).to(grad_ptr.dtype.element_ty), mask=keep)",
           "        tl.store(out + offs, (dz / temperature / temperature).to(grad_ptr.dtype.element_ty), mask=keep)",
           ("tests/test_hidden.py", "-k", "matches_token_logprobs_on_materialised_logits"),
           "the d-logits epilogue divides by the temperature twice (caught before only by the slow two-rank test)"),
    Mutant("tile_stats_bias_skipped", "kernels/linear_logprobs.py",
           "tl.where(ok, V, 0), V, temperature, True, HAS_BIAS, BLOCK_V)",
           "tl.where(ok, V, 0), V, temperature, True, False, BLOCK_V)",
           ("tests/test_hidden.py", "-k", "matches_token_logprobs_on_materialised_logits"),
           "the stats epilogue leaves the LM head's bias out of the softmax"),
    Mutant("tile_target_logit_without_bias", "kernels/linear_logprobs.py",
           "    if HAS_BIAS:\n        zt += tl.load(b_ptr + at, mask=own, other=0.0).to(tl.float32)\n", "",
           ("tests/test_hidden.py", "-k", "matches_token_logprobs_on_materialised_logits"),
           "the target logit read without the bias"),
    Mutant("chunk_validity_from_chunk_start", "kernels/linear_logprobs.py",
           "        ok = torch.arange(c0, c1, device=dev) < count", "        ok = torch.arange(0, c1 - c0, device=dev) < count",
           ("tests/test_hidden.py", "-k", "matches_token_logprobs_on_materialised_logits"),
           "which tokens of a chunk are valid counted from the chunk's start (padding read in later tiles)"),
    Mutant("last_partial_tile_dropped", "kernels/linear_logprobs.py",
           "    for c0 in range(0, N, rows):", "    for c0 in range(0, N // rows * rows or N, rows):",
           ("tests/test_hidden.py", "-k", "matches_token_logprobs_on_materialised_logits"),
           "the last, partial tile of tokens never computed"),
    Mutant("d_bias_of_the_last_tile_only", "kernels/linear_logprobs.py",
           "                db += dl.sum(0, dtype=torch.float32)", "                db = dl.sum(0, dtype=torch.float32)",
           ("tests/test_hidden.py", "-k", "matches_token_logprobs_on_materialised_logits"),
           "d bias keeps the last tile's rows instead of summing every tile's"),
    Mutant("tile_height_over_budget", "kernels/linear_logprobs.py",
           "    rows = max(1, max_tile_bytes // (4 * max(v, 1)))", "    rows = max(1, max_tile_bytes // (2 * max(v, 1)))",
           ("tests/test_hidden.py", "-k", "each_call_runs_the_steps"),
           "tiles twice the height max_tile_bytes allows (half as many chunks)"),
    Mutant("shard_entropy_not_rebased", "kernels/linear_logprobs.py",
           "    return torch.stack([s * scale, (u + s * (m - big_m)) * scale, zt])",
           "    return torch.stack([s * scale, u * scale, zt])",
           ("tests/test_hidden.py", "-k", "combine_shards"),
           "a vocabulary shard's entropy sum not moved onto the global maximum"),
    Mutant("hidden_reference_bias_dropped", "rlloss/hidden.py",
           "            logits = logits + bias.to(dtype)\n", "            logits = logits\n",
           ("tests/test_hidden.py", "-k", "bias_and_temperature_are_applied"),
           "the reference from hidden states leaves out the bias"),
    Mutant("entropy_grad_flag_ignored", "rlloss/hidden.py",
           "    if not (return_entropy and entropy_grad):", "    if not return_entropy:",
           ("tests/test_hidden.py", "-k", "matches_token_logprobs_on_materialised_logits"),
           "entropy_grad=False still returns a differentiable entropy"),
    Mutant("hidden_loss_path_entropy_unscaled", "kernels/from_hidden.py",
           "        return g[0].float() * scale, (-entropy_coef * scale if entropy_coef != 0 else None)",
           "        return g[0].float() * scale, (-entropy_coef * torch.ones_like(scale) if entropy_coef != 0 else None)",
           ("tests/test_hidden.py", "-k", "from_hidden_matches_the_loss_on_materialised_logits"),
           "the loss path's entropy-bonus gradient without the aggregation's per-token weight"),
    Mutant("token_scale_without_dp_size", "rlloss/aggregation.py",
           "    return m * per * dp_size", "    return m * per",
           ("tests/test_hidden.py", "-k", "from_hidden_matches_the_loss_on_materialised_logits"),
           "the loss path's per-token weights without dp_size (gradient too small by the number of ranks)"),
    Mutant("hidden_loss_path_local_num_seqs", "rlloss/hidden.py",
           "    scale = _token_scale(mask_b, aggregation, max_tokens=max_tokens, num_tokens=num_tokens, num_seqs=num_seqs,",
           "    scale = _token_scale(mask_b, aggregation, max_tokens=max_tokens, num_tokens=num_tokens, num_seqs=None,",
           ("tests/test_logits.py", "-k", "entropy_bonus_from_hidden"),
           "the loss path forms its gradient with the local row count, not num_seqs"),
    # --- rlloss.integrations.trl: every TRL option the trainer translates (run in the trainers' environment) -
    T("trl_grpo_rows_without_ga", "rlloss/integrations/trl.py",
      "    rows = mask.shape[0] * ga", "    rows = mask.shape[0]",
      (f"{TRL}::test_compute_loss_matches_trl[grpo]",),
      "loss_type='grpo' (and sapo, dr_grpo, luspo) normalised without the accumulation steps"),
    T("trl_bnpo_tokens_without_ga", "rlloss/integrations/trl.py",
      '        return {"aggregation": "token_mean", "num_tokens": mask.sum() * ga}',
      '        return {"aggregation": "token_mean", "num_tokens": mask.sum()}',
      (f"{TRL}::test_compute_loss_matches_trl[bnpo]",),
      "loss_type='bnpo' normalised by the micro-batch's tokens without the accumulation steps"),
    T("trl_dr_grpo_padded_length", "rlloss/integrations/trl.py",
      '        return {"aggregation": "constant", "max_tokens": max_completion_length, "num_seqs": rows}',
      '        return {"aggregation": "constant", "max_tokens": mask.shape[-1], "num_seqs": rows}',
      (f"{TRL}::test_compute_loss_matches_trl[dr_grpo-max-len]",),
      "loss_type='dr_grpo' divides by the batch's padded length, not max_completion_length"),
    T("trl_dapo_tokens_without_spg", "rlloss/integrations/trl.py",
      "            tokens = tokens * accumulation_steps / steps_per_generation",
      "            tokens = tokens",
      (f"{TRL}::test_compute_loss_matches_trl[dapo-spg4]",),
      "loss_type='dapo' (cispo, vespo) ignores steps_per_generation != gradient_accumulation_steps"),
    T("trl_luspo_token_mean", "rlloss/integrations/trl.py",
      '        return {"aggregation": "seq_mean_token_sum", "num_seqs": rows}',
      '        return {"aggregation": "seq_mean_token_mean", "num_seqs": rows}',
      (f"{TRL}::test_compute_loss_matches_trl[luspo]",),
      "loss_type='luspo' takes each row's mean instead of its sum"),
    T("trl_eval_divides_by_ga", "rlloss/integrations/trl.py",
      "    ga = accumulation_steps if training else 1", "    ga = accumulation_steps",
      (f"{TRL}", "-k", "in_eval and grpo"),
      "in eval the loss is divided by the accumulation steps (TRL divides only in training)"),
    T("trl_epsilon_high_ignored", "rlloss/integrations/trl.py",
      "        return rlloss.PPO(eps_low=trainer.epsilon_low, eps_high=trainer.epsilon_high, delta=args.delta,",
      "        return rlloss.PPO(eps_low=trainer.epsilon_low, eps_high=trainer.epsilon_low, delta=args.delta,",
      (f"{TRL}::test_compute_loss_matches_trl[dapo-high-delta]",),
      "TRL's epsilon_high not passed on (DAPO's clip-higher lost)"),
    T("trl_delta_ignored", "rlloss/integrations/trl.py",
      "eps_high=trainer.epsilon_high, delta=args.delta,", "eps_high=trainer.epsilon_high, delta=None,",
      (f"{TRL}::test_compute_loss_matches_trl[dapo-high-delta]",),
      "TRL's delta (two-sided clipping) not passed on"),
    T("trl_importance_sampling_level_ignored", "rlloss/integrations/trl.py",
      "                          level=trainer.importance_sampling_level)", '                          level="token")',
      (f"{TRL}::test_compute_loss_matches_trl[grpo-sequence-beta]",),
      "importance_sampling_level='sequence' (GSPO) run at token level"),
    T("trl_cispo_default_cap", "rlloss/integrations/trl.py",
      "        return rlloss.CISPO(low=None, high=trainer.epsilon_high)", "        return rlloss.CISPO(low=None, high=5.0)",
      (f"{TRL}::test_compute_loss_matches_trl[cispo-beta]",),
      "loss_type='cispo' ignores epsilon_high (TRL's cap on the weight)"),
    T("trl_sapo_temperatures_swapped", "rlloss/integrations/trl.py",
      "        return rlloss.SAPO(tau_pos=args.sapo_temperature_pos, tau_neg=args.sapo_temperature_neg)",
      "        return rlloss.SAPO(tau_pos=args.sapo_temperature_neg, tau_neg=args.sapo_temperature_pos)",
      (f"{TRL}::test_compute_loss_matches_trl[sapo-beta]",),
      "sapo_temperature_pos and _neg swapped"),
    T("trl_vespo_k_neg", "rlloss/integrations/trl.py",
      "k_neg=args.vespo_k_neg,", "k_neg=args.vespo_k_pos,",
      (f"{TRL}::test_compute_loss_matches_trl[vespo]",),
      "vespo_k_neg read from vespo_k_pos"),
    T("trl_kl_kind", "rlloss/integrations/trl.py",
      '            logp, old, adv, valid, objective=objective, ref_logp=ref, beta=self.beta, kl="k3",',
      '            logp, old, adv, valid, objective=objective, ref_logp=ref, beta=self.beta, kl="k1",',
      (f"{TRL}::test_compute_loss_matches_trl[grpo-beta-nobias]",),
      "beta's KL with k1 instead of TRL's k3"),
    T("trl_bias_correction_ignored", "rlloss/integrations/trl.py",
      "            kl_bias_correction=bool(self.args.use_bias_correction_kl), token_weights=weights,",
      "            kl_bias_correction=False, token_weights=weights,",
      (f"{TRL}::test_compute_loss_matches_trl[grpo-beta-bias]",),
      "use_bias_correction_kl ignored"),
    T("trl_top_entropy_quantile_ignored", "rlloss/integrations/trl.py",
      "            weights = entropy_mask.to(logp.dtype)", "            weights = torch.ones_like(logp)",
      (f"{TRL}::test_compute_loss_matches_trl[dapo-top-entropy-bonus]",),
      "top_entropy_quantile's mask not applied to the policy loss"),
    T("trl_off_policy_mask_sampling_ignored", "rlloss/integrations/trl.py",
      '            sampling = inputs.get("sampling_per_token_logps", logp.detach() if old is None else old)',
      '            sampling = logp.detach() if old is None else old',
      (f"{TRL}::test_compute_loss_matches_trl[grpo-off-policy-mask]",),
      "off_policy_mask_threshold measured against the old log-probs where TRL has the sampler's"),
    T("trl_off_policy_mask_threshold", "rlloss/integrations/trl.py",
      "threshold=self.off_policy_mask_threshold)", "threshold=self.off_policy_mask_threshold + 0.5)",
      (f"{TRL}::test_compute_loss_matches_trl[dapo-off-policy-mask]",),
      "off_policy_mask_threshold misread"),
    T("trl_vllm_is_ratio_ignored", "rlloss/integrations/trl.py",
      '            isr = inputs["importance_sampling_ratio"].detach().to(logp.dtype).expand_as(logp)',
      '            isr = torch.ones_like(logp)',
      (f"{TRL}::test_compute_loss_matches_trl[dapo-vllm-token]",),
      "the vLLM importance-sampling ratio not applied"),
    T("trl_vespo_isr_folded_with_wrong_sign", "rlloss/integrations/trl.py",
      "            old = (logp.detach() if old is None else old) - log_isr",
      "            old = (logp.detach() if old is None else old) + log_isr",
      (f"{TRL}::test_compute_loss_matches_trl[vespo-vllm]",),
      "VESPO's vLLM ratio folded into the row sum with the wrong sign"),
    T("trl_tool_mask_ignored", "rlloss/integrations/trl.py",
      '            mask = mask * inputs["tool_mask"]', '            mask = mask',
      (f"{TRL}::test_compute_loss_matches_trl[grpo-tool-mask]",),
      "tool-output tokens trained on"),
    T("trl_entropy_bonus_without_ga", "rlloss/integrations/trl.py",
      "            loss = loss - self.entropy_coef * rlloss.masked_mean(entropies, effective) / ga",
      "            loss = loss - self.entropy_coef * rlloss.masked_mean(entropies, effective)",
      (f"{TRL}::test_compute_loss_matches_trl[grpo-entropy-bonus]",),
      "entropy_coef's bonus not divided for accumulation"),
    T("trl_vespo_policy_loss_metric", "rlloss/integrations/trl.py",
      '            scale = 1 if self.loss_type in ("dapo", "cispo", "vespo") else ga',
      '            scale = 1 if self.loss_type in ("dapo", "cispo") else ga',
      (f"{TRL}::test_compute_loss_matches_trl[vespo-entropy-bonus]",),
      "the logged policy_loss of loss_type='vespo' with an entropy bonus multiplied by GA"),
    T("trl_scale_rewards_ignored", "rlloss/integrations/trl.py",
      "        advantages = trl_group_advantages(rewards, num_generations, self.scale_rewards)",
      '        advantages = trl_group_advantages(rewards, num_generations, "group")',
      (f"{TRL}::test_advantages_match_trl[batch]",),
      "scale_rewards ignored by the advantages"),
    T("trl_reward_weights_ignored", "rlloss/integrations/trl.py",
      "        rewards = (rewards_per_func * weights).nansum(dim=1)", "        rewards = rewards_per_func.nansum(dim=1)",
      (f"{TRL}", "-k", "several_reward_functions"),
      "reward_weights ignored when summing several reward functions"),
    T("trl_unscorable_if_any_function_is_none", "rlloss/integrations/trl.py",
      "        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan",
      "        rewards[torch.isnan(rewards_per_func).any(dim=1)] = torch.nan",
      (f"{TRL}", "-k", "several_reward_functions"),
      "a row unscorable when one reward function returns None (TRL: when all do)"),
    T("trl_objective_ignored", "rlloss/integrations/trl.py",
      "        objective = loss_type_objective(self) if self.rlloss_objective is None else self.rlloss_objective",
      "        objective = loss_type_objective(self)",
      (f"{TRL}", "-k", "objectives_trl_lacks_train"),
      "objective= ignored: TRL's loss_type runs instead"),
    T("trl_hidden_path_temperature", "rlloss/integrations/trl.py",
      "bias=bias, temperature=self.temperature,", "bias=bias, temperature=1.0,",
      (f"{TRL}::test_loss_from_hidden_matches_trl[grpo-temperature-nobias]",),
      "use_liger_kernel=True's log-probs at temperature 1, not TRL's"),
    T("trl_hidden_path_entropy_detached", "rlloss/integrations/trl.py",
      "                entropy_grad=bool(self._entropy_bonus_enabled))", "                entropy_grad=False)",
      (f"{TRL}::test_loss_from_hidden_matches_trl[grpo-entropy-bonus]",),
      "use_liger_kernel=True: the entropy bonus without its gradient"),
    T("trl_clip_metric_sign", "rlloss/integrations/trl.py",
      "            low = (ratio < 1 - self.epsilon_low) & (a < 0)", "            low = (ratio < 1 - self.epsilon_low) & (a > 0)",
      (f"{TRL}::test_compute_loss_matches_trl[dapo-high-delta]",),
      "TRL's clip_ratio/low_mean metric counted on positive advantages"),
    T("trl_recipe_config_level", "rlloss/integrations/trl.py",
      '            if recipe.level == "sequence":', "            if False:",
      (f"{TRL}", "-k", "config_named_for_a_recipe"),
      "the GRPOConfig named for GSPO lacks importance_sampling_level='sequence'"),
    T("trl_recipe_name_as_objective", "rlloss/integrations/trl.py",
      "    if isinstance(objective, rlloss.Recipe) or isinstance(objective, str) and objective in RECIPES:",
      "    if isinstance(objective, rlloss.Recipe):",
      (f"{TRL}", "-k", "recipe_as_objective"),
      "a recipe's name as objective= not told apart from an objective's"),
    # --- rlloss.integrations.verl: every verl option the losses and estimators read -----------------------
    T("verl_clip_ratio_low_ignored", "rlloss/integrations/verl.py",
      '    return _get(config, "clip_ratio_low", clip), _get(config, "clip_ratio_high", clip)',
      '    return clip, _get(config, "clip_ratio_high", clip)',
      (VERL, "-k", "policy_loss_matches_verl and cispo and token-mean"),
      "clip_ratio_low ignored (clip_ratio instead)"),
    T("verl_clip_ratio_high_ignored", "rlloss/integrations/verl.py",
      '    return _get(config, "clip_ratio_low", clip), _get(config, "clip_ratio_high", clip)',
      '    return _get(config, "clip_ratio_low", clip), clip',
      (VERL, "-k", "policy_loss_matches_verl and ppo and token-mean"),
      "clip_ratio_high ignored"),
    T("verl_clip_ratio_c_ignored", "rlloss/integrations/verl.py",
      '    return rlloss.PPO(eps_low=low, eps_high=high, dual_clip=_get(config, "clip_ratio_c", 3.0))',
      '    return rlloss.PPO(eps_low=low, eps_high=high, dual_clip=3.0)',
      (VERL, "-k", "policy_loss_matches_verl and ppo and token-mean"),
      "clip_ratio_c (the dual clip) ignored"),
    T("verl_cispo_high_from_low", "rlloss/integrations/verl.py",
      "    return rlloss.CISPO(low=1 - low, high=1 + high)", "    return rlloss.CISPO(low=1 - low, high=1 + low)",
      (VERL, "-k", "policy_loss_matches_verl and cispo and token-mean"),
      "rlloss_cispo's upper bound from clip_ratio_low"),
    T("verl_sapo_tau_neg_ignored", "rlloss/integrations/verl.py",
      '_get(config, "tau_neg", 1.05))', "1.05)",
      (VERL, "-k", "policy_loss_matches_verl and sapo and token-mean"),
      "tau_neg ignored"),
    T("verl_sapo_mode_not_forced", "rlloss/integrations/verl.py",
      '    "sapo": (_sapo, "sapo", "seq-mean-token-mean"),', '    "sapo": (_sapo, "sapo", None),',
      (VERL, "-k", "policy_loss_matches_verl and sapo and token-mean"),
      "rlloss_sapo follows loss_agg_mode (verl's sapo forces seq-mean-token-mean)"),
    T("verl_dppo_weight_cap_ignored", "rlloss/integrations/verl.py",
      'weight_cap=_get(config, "clip_ratio_c", 3.0))', "weight_cap=3.0)",
      (VERL, "-k", "policy_loss_matches_verl and dppo_tv and token-mean"),
      "DPPO's weight cap not read from clip_ratio_c"),
    T("verl_gmpo_bounds_swapped", "rlloss/integrations/verl.py",
      "    return rlloss.GMPO(log_clip_low=low, log_clip_high=high)",
      "    return rlloss.GMPO(log_clip_low=high, log_clip_high=low)",
      (VERL, "-k", "gmpo_matches_verl_geo_mean and token-mean"),
      "geo_mean's clip_ratio_low/high swapped"),
    T("verl_kl_cov_coef_ignored", "rlloss/integrations/verl.py",
      'coef=_get(loss, "ppo_kl_coef", 1.0))', "coef=1.0)",
      (VERL, "-k", "policy_loss_matches_verl and kl_cov and token-mean"),
      "ppo_kl_coef ignored"),
    T("verl_clip_cov_lb_ignored", "rlloss/integrations/verl.py",
      'cov_low=_get(loss, "clip_cov_lb", 1.0)', "cov_low=1.0",
      (VERL, "-k", "policy_loss_matches_verl and clip_cov and token-mean"),
      "clip_cov_lb ignored"),
    T("verl_dro_beta_doubled", "rlloss/integrations/verl.py",
      "    return rlloss.DRO(beta=beta)", "    return rlloss.DRO(beta=2 * beta)",
      (VERL, "-k", "policy_loss_matches_verl and dro and token-mean"),
      "dro_beta misread"),
    T("verl_token_mean_local_tokens", "rlloss/integrations/verl.py",
      '        return {"aggregation": "token_mean", "num_tokens": tokens, "dp_size": dp_size}',
      '        return {"aggregation": "token_mean", "num_tokens": None, "dp_size": dp_size}',
      (VERL, "-k", "policy_loss_matches_verl and ppo and token-mean and global"),
      "token-mean normalised by the micro-batch's tokens, not global_batch_info's batch_num_tokens"),
    T("verl_token_sum_without_dp_size", "rlloss/integrations/verl.py",
      '        return {"aggregation": "token_sum", "dp_size": dp_size}', '        return {"aggregation": "token_sum", "dp_size": 1}',
      (VERL, "-k", "policy_loss_matches_verl and ppo and token-sum and global"),
      "token-sum without dp_size"),
    T("verl_seq_mean_counts_empty_rows", "rlloss/integrations/verl.py",
      "        seqs = mask.any(-1).sum()  # verl counts the non-empty rows", "        seqs = mask.shape[0]",
      (VERL, "-k", "policy_loss_matches_verl and ppo and seq-mean-token-mean and local"),
      "the seq-mean modes count empty rows (verl counts the non-empty ones)"),
    T("verl_seq_mean_token_sum_as_mean", "rlloss/integrations/verl.py",
      '        return {"aggregation": "seq_mean_token_sum", "num_seqs": seqs, "dp_size": dp_size}',
      '        return {"aggregation": "seq_mean_token_mean", "num_seqs": seqs, "dp_size": dp_size}',
      (VERL, "-k", "policy_loss_matches_verl and ppo and seq-mean-token-sum-"),
      "seq-mean-token-sum mapped to the per-row mean"),
    T("verl_loss_scale_factor_ignored", "rlloss/integrations/verl.py",
      '        scale = info.get("loss_scale_factor") or mask.shape[-1]', "        scale = mask.shape[-1]",
      (VERL, "-k", "loss_scale_factor"),
      "ActorConfig.loss_scale_factor ignored in seq-mean-token-sum-norm (no test set it before)"),
    T("verl_rollout_is_weights_ignored", "rlloss/integrations/verl.py",
      "        weights = None if rollout_is_weights is None else rollout_is_weights.detach()", "        weights = None",
      (VERL, "-k", "policy_loss_matches_verl and ppo and token-mean and is-weights"),
      "rollout_is_weights dropped"),
    T("verl_clipfrac_lower_from_clip_low", "rlloss/integrations/verl.py",
      '"pg_clipfrac_lower": metrics["clip_dual"]}', '"pg_clipfrac_lower": metrics["clip_low"]}',
      (VERL, "-k", "ppo_metrics_match_verl"),
      "actor/pg_clipfrac_lower logged from the low clip instead of the dual clip"),
    T("verl_ppo_kl_metric_sign", "rlloss/integrations/verl.py",
      "        log_ratio = torch.where(mask, (old_log_prob - log_prob).detach(), 0.0)",
      "        log_ratio = torch.where(mask, (log_prob - old_log_prob).detach(), 0.0)",
      (VERL, "-k", "ppo_metrics_match_verl"),
      "actor/ppo_kl with the wrong sign"),
    T("verl_norm_adv_by_std_ignored", "rlloss/integrations/verl.py",
      '        if scale == "group" and not _get(config, "norm_adv_by_std_in_grpo", True):', "        if False:",
      (VERL, "-k", "grpo_through_compute_advantage"),
      "algorithm.norm_adv_by_std_in_grpo=False ignored"),
    T("verl_grpo_singleton_zero", "rlloss/integrations/verl.py",
      '        adv = rlloss.group_advantages(scores, groups=groups, baseline=baseline, scale=chosen, eps=VERL_EPS,\n'
      '                                      singleton="keep")',
      '        adv = rlloss.group_advantages(scores, groups=groups, baseline=baseline, scale=chosen, eps=VERL_EPS,\n'
      '                                      singleton="zero")',
      (VERL, "-k", "estimators_match_verl and grpo"),
      "rlloss_grpo gives a lone response 0 (verl keeps its score)"),
    T("verl_rloo_mean_baseline", "rlloss/integrations/verl.py",
      '    "rloo": (_grouped("none", baseline="loo"), "rloo"),', '    "rloo": (_grouped("none"), "rloo"),',
      (VERL, "-k", "estimators_match_verl and rloo"),
      "rlloss_rloo with the group mean, not the leave-one-out baseline"),
    T("verl_gpg_singleton_zero", "rlloss/integrations/verl.py",
      "    adv = rlloss.gpg_advantages(scores, groups=_group_ids(index, scores.device), mask=response_mask, singleton=\"keep\")",
      "    adv = rlloss.gpg_advantages(scores, groups=_group_ids(index, scores.device), mask=response_mask, singleton=\"zero\")",
      (VERL, "-k", "estimators_match_verl and gpg"),
      "rlloss_gpg gives a lone response 0"),
    T("verl_gpg_counts_positive_scores", "rlloss/advantages.py",
      "    nonzero = (s != 0).sum().to(s.dtype)", "    nonzero = (s > 0).sum().to(s.dtype)",
      (VERL, "-k", "estimators_match_verl and gpg"),
      "GPG's alpha counts only positive scores, against verl's gpg on signed rewards"),
    T("verl_gamma_ignored", "rlloss/integrations/verl.py",
      '    gamma = _get(config, "gamma", 1.0)', "    gamma = 1.0",
      (VERL, "-k", "estimators_match_verl and reinforce_plus_plus"),
      "algorithm.gamma ignored by rlloss_reinforce_plus_plus"),
    T("verl_reregistration_raises", "rlloss/integrations/verl.py",
      "            continue  # registered by an earlier import of this module; verl refuses to rebind a name",
      "            pass",
      (VERL, "-k", "reimport_is_idempotent"),
      "importing the module twice raises in verl's register_adv_est"),
    # --- rlloss.audit's trainer front ends ---------------------------------------------------------------------
    T("audit_trl_generation_window", "rlloss/audit/trl.py",
      "        start = (m // per_generation) * per_generation", "        start = m",
      ("tests/test_audit_trainers.py", "-k", "trl_loss_types and dapo"),
      "audit_trl's num_items_in_batch counted over the wrong generation window (steps_per_generation; seen only "
      "where a step spans two generations, GA > spg: the docs' GA=4, spg=8 case gives the same count)"),
    T("audit_verl_counts_dropped", "rlloss/audit/verl.py",
      '        tu.assign_non_tensor_data(data, "global_batch_size", window.num_seqs)',
      '        tu.assign_non_tensor_data(data, "global_batch_size", None)',
      ("tests/test_audit_trainers.py", "-k", "rlloss_verl_gmpo"),
      "audit_verl hands verl no global sequence count"),
)


def run_pytest(python: str, args: tuple[str, ...], timeout: float, profile: str,
               trainers: bool) -> tuple[int, float, str]:
    env = {**os.environ, "HYPOTHESIS_PROFILE": profile, "PYTHONDONTWRITEBYTECODE": "1"}
    env.setdefault("TRITON_INTERPRET", "1")
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    marker = ("-m", "trainers") if trainers else ()
    cmd = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *marker, *args]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, time.monotonic() - start, "timeout"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("FAILED") or " passed" in line
             or " failed" in line or "error" in line.lower()]
    if proc.returncode == 0 and not any(" passed" in line for line in lines):
        return 5, time.monotonic() - start, "no test ran"  # all deselected or skipped: a selection that tests nothing
    return proc.returncode, time.monotonic() - start, (lines[0] if lines else proc.stdout[-300:]).strip()


def check_text(mutant: Mutant) -> str:
    """The file's text; stops the script when the text to replace does not occur exactly once."""
    original = (ROOT / mutant.path).read_text()
    count = original.count(mutant.old)
    if count != 1:
        raise SystemExit(f"{mutant.name}: the text to replace occurs {count} times in {mutant.path} (expected 1); "
                         "update the mutant to the current code")
    return original


def apply(mutant: Mutant, python: str, timeout: float, profile: str) -> tuple[str, float, str]:
    path = ROOT / mutant.path
    original = check_text(mutant)
    try:
        path.write_text(original.replace(mutant.old, mutant.new))
        rc, seconds, detail = run_pytest(python, mutant.tests, timeout, profile, mutant.trainers)
    finally:
        path.write_text(original)
    verdict = {0: "SURVIVED", 1: "killed"}.get(rc, "broken")
    return verdict, seconds, detail


def version(python: str, package: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({package!r}))"
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--check", action="store_true",
                        help="only check that every mutant's text occurs exactly once (no test runs)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant")
    parser.add_argument("--skip-baseline", action="store_true", help="do not first run each test set unmutated")
    parser.add_argument("--profile", default="explicit",
                        help="hypothesis profile of tests/conftest.py (default: explicit, no drawn examples)")
    parser.add_argument("--trainers-python", default=os.environ.get("RLLOSS_TRAINERS_PYTHON"),
                        help="the interpreter of the environment with TRL and verl, for the trainers mutants "
                             "(default: $RLLOSS_TRAINERS_PYTHON)")
    parser.add_argument("--skip-trainers", action="store_true", help="leave out the trainers mutants")
    parser.add_argument("--only-trainers", action="store_true", help="only the trainers mutants")
    args = parser.parse_args(argv)
    # a SIGTERM unwinds like Ctrl-C, through apply()'s finally: the mutated file is restored
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        raise SystemExit(f"unknown mutants: {sorted(unknown)}")
    chosen = [m for m in MUTANTS if (not args.names or m.name in args.names)
              and not (args.skip_trainers and m.trainers) and not (args.only_trainers and not m.trainers)]
    if args.list:
        for m in chosen:
            print(f"{m.name:44s} {m.path:34s} {'[trainers] ' if m.trainers else ''}{m.why}")
        return 0
    for m in chosen:
        check_text(m)
    if args.check:
        print(f"{len(chosen)} mutants, each text found once")
        return 0
    if any(m.trainers for m in chosen) and not args.trainers_python:
        raise SystemExit("trainers mutants need --trainers-python (or $RLLOSS_TRAINERS_PYTHON): the python of an "
                         "environment with TRL 1.16 and verl 0.9.1; or --skip-trainers")

    def python_of(m: Mutant) -> str:
        return args.trainers_python if m.trainers else sys.executable

    pythons = dict.fromkeys(python_of(m) for m in chosen)
    for python in pythons:
        print(f"{python}: hypothesis {version(python, 'hypothesis')}, torch {version(python, 'torch')}, "
              f"profile {args.profile}", flush=True)
    start = time.monotonic()
    if not args.skip_baseline:  # a mutant is only killed by tests that pass without it
        for python, tests, trainers in dict.fromkeys((python_of(m), m.tests, m.trainers) for m in chosen):
            rc, seconds, detail = run_pytest(python, tests, args.timeout, args.profile, trainers)
            if rc != 0:
                raise SystemExit(f"the unmutated code fails {' '.join(tests)} ({detail}); fix that first")
        print(f"baseline: every test selection passes unmutated ({time.monotonic() - start:.0f} s)", flush=True)
    print("| mutant | bug it stands for | file | tests run | result | s |\n|---|---|---|---|---|---|")
    survived = 0
    for m in chosen:
        verdict, seconds, detail = apply(m, python_of(m), args.timeout, args.profile)
        survived += verdict != "killed"
        marker = "-m trainers " if m.trainers else ""
        print(f"| `{m.name}` | {m.why} | {m.path} | `{marker}{' '.join(m.tests)}` | {verdict} | {seconds:.0f} |",
              flush=True)
        if verdict != "killed":
            print(f"    {detail}", file=sys.stderr)
    print(f"\n{len(chosen) - survived}/{len(chosen)} killed in {time.monotonic() - start:.0f} s")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
