"""Mutation check: apply plausible bugs one at a time and see that the tests catch each.

Each mutant replaces one exact piece of source text (it must occur exactly once, so a refactor
that moves the code makes the script fail loudly rather than test nothing), runs the tests that
should catch it with the ``ci`` hypothesis profile, and restores the file, whatever happens. A
mutant is *killed* when pytest reports a failing test (exit status 1); *survived* when the tests
pass; *broken* for anything else (an import or collection error is not a plausible bug).

Not part of CI (about five minutes on two cores). Run it when the suite or the code changes:

    TRITON_INTERPRET=1 .venv/bin/python tools/mutate.py            # every mutant
    TRITON_INTERPRET=1 .venv/bin/python tools/mutate.py --list
    TRITON_INTERPRET=1 .venv/bin/python tools/mutate.py eps_swapped where_to_multiply_old

The list and the last results: tools/MUTATION.md.
"""

from __future__ import annotations

import argparse
import os
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
)


def run_pytest(args: tuple[str, ...], timeout: float) -> tuple[int, float, str]:
    env = {**os.environ, "HYPOTHESIS_PROFILE": "ci", "PYTHONDONTWRITEBYTECODE": "1"}
    env.setdefault("TRITON_INTERPRET", "1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, time.monotonic() - start, "timeout"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("FAILED") or " passed" in line
             or " failed" in line or "error" in line.lower()]
    return proc.returncode, time.monotonic() - start, (lines[0] if lines else proc.stdout[-300:]).strip()


def apply(mutant: Mutant, timeout: float) -> tuple[str, float, str]:
    path = ROOT / mutant.path
    original = path.read_text()
    count = original.count(mutant.old)
    if count != 1:
        raise SystemExit(f"{mutant.name}: the text to replace occurs {count} times in {mutant.path} (expected 1); "
                         "update the mutant to the current code")
    try:
        path.write_text(original.replace(mutant.old, mutant.new))
        rc, seconds, detail = run_pytest(mutant.tests, timeout)
    finally:
        path.write_text(original)
    verdict = {0: "SURVIVED", 1: "killed"}.get(rc, "broken")
    return verdict, seconds, detail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant")
    parser.add_argument("--skip-baseline", action="store_true", help="do not first run each test set unmutated")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        raise SystemExit(f"unknown mutants: {sorted(unknown)}")
    if args.list:
        for m in chosen:
            print(f"{m.name:38s} {m.path:24s} {m.why}")
        return 0
    if not args.skip_baseline:  # a mutant is only killed by tests that pass without it
        for tests in dict.fromkeys(m.tests for m in chosen):
            rc, seconds, detail = run_pytest(tests, args.timeout)
            if rc != 0:
                raise SystemExit(f"the unmutated code fails {' '.join(tests)} ({detail}); fix that first")
    print("| mutant | file | tests | result | seconds |\n|---|---|---|---|---|")
    survived = 0
    for m in chosen:
        verdict, seconds, detail = apply(m, args.timeout)
        survived += verdict != "killed"
        print(f"| `{m.name}` | {m.path} | {' '.join(m.tests)} | {verdict} | {seconds:.0f} |", flush=True)
        if verdict != "killed":
            print(f"    {detail}", file=sys.stderr)
    print(f"\n{len(chosen) - survived}/{len(chosen)} killed")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
