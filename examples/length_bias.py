"""What GRPO, DAPO and Dr. GRPO change: a CPU-sized RL run with rlloss, end to end.

The task. A prompt is ``a b =`` with two digits ``a, b`` in ``0..modulus-1``; the policy writes a
completion of at most ``max_len`` tokens. Its first token is the answer, graded by a rule-based
verifier: reward 1 if it is the digit ``(a + b) % modulus``, else 0. Every token after it is free
"reasoning" (any token but EOS) until the policy writes EOS or runs out of budget. The verifier reads
only the first token, so **correctness does not depend on length**: a response of 2 tokens and one
of ``max_len`` tokens with the same first token get the same reward, and a truncated response is
graded like any other. Any trend in response length therefore comes from the objective alone (its
normaliser, its advantage scale, DAPO's overlong penalty), not from the task.

The policy is a tiny autoregressive GRU language model in plain PyTorch (an embedding, one GRU
layer, a linear head; about 20k parameters) over a vocabulary of the digits, a few filler tokens,
``=`` and EOS. At initialisation every token, EOS included, has about the same probability, so
responses start with a spread of lengths (mean about 10 of 32) and the answer is right by chance.

The trainer is what a trainer author writes around rlloss (``train_run``): sample ``prompts`` prompts
and ``G`` completions each, score them, compute group advantages with the recipe's preset, then take
``updates`` optimiser steps on mini-batches of that batch, each step accumulated over ``micro``
micro-batches with the step's global token and row counts (``rlloss.distributed.step_counts``), the
log-probs of the sampling policy as ``old_logp``, and the KL to a frozen copy of the initial policy
(weighted by the recipe's ``beta``: 0.04 for GRPO, 0 for the others; it is always measured). The
recipes are the presets ``rlloss.GRPO``, ``rlloss.DR_GRPO`` and ``rlloss.DAPO``:

* GRPO as published: group-std advantages, per-response length normalisation
  (``seq_mean_token_mean``), symmetric clip 0.2, k3 KL with ``beta=0.04``.
* Dr. GRPO: advantages ``r - mean`` without the std, token sums divided by the constant
  ``max_tokens = max_len``, no KL.
* DAPO: clip-higher (0.2 / 0.28), ``token_mean``, dynamic sampling that keeps only groups whose
  correctness rewards differ and samples more prompts until the batch holds ``prompts`` such groups
  (at most ``max_rounds`` generation rounds; past that it trains on the groups it has), overlong
  filtering (truncated responses are masked out of the loss) and the soft overlong penalty added to
  the reward, with the paper's ratio ``cache_len / max_len = 4096 / 20480`` scaled to this budget.

``--ablations`` adds two variants that change one setting of a preset through the overrides that
``Recipe.loss`` accepts: GRPO with ``beta=0`` (its normaliser without its KL term) and DAPO with
the symmetric clip ``eps_high=0.2`` (DAPO without clip-higher).

Logged per step (from the first generation round, the same amount of data for every recipe):
accuracy of the sampled answers and of the greedy answer over every prompt, the mean length
(tokens, EOS included) of correct and of incorrect responses and their difference, the truncated
fraction, the policy's mean per-token entropy and that of the answer token, the clip fractions and
KL (token means over the step's updates), the fraction of sampled groups that dynamic sampling
keeps, the groups with a gradient in the trained batch as a fraction of the batch size ``prompts``
(DAPO: 1 when dynamic sampling filled the batch), and the responses sampled.

Usage::

    python examples/length_bias.py compare              # 3 recipes x 3 seeds, plot and logs (~3 min)
    python examples/length_bias.py compare --ablations  # and the two ablations (~5 min)
    python examples/length_bias.py compare --quick      # a short, easy setting (under a minute)
    python examples/length_bias.py train --recipe dapo --seed 0
    python examples/length_bias.py plot examples/results/compare.json

``compare`` runs ``--workers`` (2) training runs at once in worker processes, ``--threads`` (1)
torch threads each. ``--backend triton`` runs every rlloss call on the Triton kernels; without CUDA
they run in Triton's CPU interpreter, which this script turns on by setting ``TRITON_INTERPRET=1``
before triton is imported. The interpreter is slow (about 10 s a step at the ``--quick`` sizes):
give it a few ``--steps``. Results (JSON, CSV, PNG) go to ``examples/results/``. The same seed,
settings and thread count give identical logs.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any


def _set_triton_interpreter(argv: list[str]) -> None:
    """``--backend triton`` on a CPU device needs Triton's interpreter, switched on before triton loads."""
    wants_triton = any(a == "--backend=triton" for a in argv) or any(
        a == "--backend" and b == "triton" for a, b in zip(argv, argv[1:]))
    on_cuda = any(a.startswith("--device=cuda") for a in argv) or any(
        a == "--device" and b.startswith("cuda") for a, b in zip(argv, argv[1:]))
    if wants_triton and not on_cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")


if __name__ == "__main__":
    _set_triton_interpreter(sys.argv[1:])

import torch  # noqa: E402

import rlloss  # noqa: E402
import rlloss.distributed  # noqa: E402

# The three recipes, each its rlloss preset as published; two ablations (opt-in, ``--ablations``)
# change one setting of a preset, through the keyword overrides that ``Recipe.loss`` accepts.
RECIPES: dict[str, tuple[rlloss.Recipe, dict[str, Any]]] = {
    "grpo": (rlloss.GRPO, {}),
    "dr_grpo": (rlloss.DR_GRPO, {}),
    "dapo": (rlloss.DAPO, {}),
    "grpo_nokl": (rlloss.GRPO, {"beta": 0.0}),
    "dapo_symclip": (rlloss.DAPO, {"eps_high": 0.2}),
}
MAIN = ["grpo", "dr_grpo", "dapo"]
ABLATIONS = ["grpo_nokl", "dapo_symclip"]
LABELS = {"grpo": "GRPO", "dr_grpo": "Dr. GRPO", "dapo": "DAPO", "grpo_nokl": "GRPO, beta=0",
          "dapo_symclip": "DAPO, symmetric clip 0.2"}
COLORS = {"grpo": "tab:red", "dr_grpo": "tab:blue", "dapo": "tab:green", "grpo_nokl": "tab:orange",
          "dapo_symclip": "tab:olive"}
STYLES = {"grpo_nokl": "--", "dapo_symclip": "--"}

# Logged per step; the plotted ones, with their panel titles.
PANELS = {
    "acc": "accuracy (sampled answers)",
    "greedy_acc": "accuracy (greedy, all prompts)",
    "len_correct": "mean length, correct responses",
    "len_incorrect": "mean length, incorrect responses",
    "len_gap": "incorrect minus correct length",
    "trunc_frac": "truncated fraction",
    "entropy": "policy entropy (nats/token)",
    "entropy_answer": "entropy of the answer token (nats)",
    "clip_low": "clip fraction, low (r < 1-eps, A < 0)",
    "clip_high": "clip fraction, high (r > 1+eps, A > 0)",
    "kl": "KL to the initial policy (k3)",
    "keep_frac": "groups kept by dynamic sampling",
    "signal_frac": "groups with a gradient / batch size",
    "samples": "responses sampled per step",
}


@dataclasses.dataclass
class Config:
    """Settings of one run (the defaults are those of ``compare``)."""

    steps: int = 200            # training steps (one sampled batch each)
    prompts: int = 16           # prompts per batch (groups)
    group: int = 8              # completions per prompt (G)
    max_len: int = 32           # generation budget, EOS included
    cache_len: int = 0          # DAPO's soft-penalty interval; 0: max_len * 4096 / 20480
    modulus: int = 5            # digits; answer = (a + b) % modulus
    fillers: int = 4            # extra "reasoning" tokens in the vocabulary
    dim: int = 32               # embedding size
    hidden: int = 64            # GRU width
    lr: float = 2e-3
    updates: int = 4            # optimiser steps per sampled batch (mini-batches)
    micro: int = 2              # micro-batches per optimiser step (gradient accumulation)
    grad_clip: float = 1.0
    max_rounds: int = 4         # DAPO: generation rounds at most per step to fill the batch
    beta: float | None = None   # KL coefficient; None: the recipe's (GRPO 0.04, others 0)
    backend: str = "torch"
    device: str = "cpu"

    def cache(self) -> int:
        return self.cache_len or max(1, round(self.max_len * 4096 / 20480))


QUICK = {"steps": 60, "prompts": 8, "group": 8, "max_len": 16, "modulus": 3, "hidden": 64, "lr": 5e-3}


class Task:
    """Prompts ``a b =``, the verifier, and the vocabulary: digits, fillers, ``=``, EOS."""

    def __init__(self, modulus: int, fillers: int, device: str):
        self.modulus = modulus
        self.eq = modulus + fillers
        self.eos = modulus + fillers + 1
        self.vocab = modulus + fillers + 2
        a, b = torch.meshgrid(torch.arange(modulus), torch.arange(modulus), indexing="ij")
        eq = torch.full_like(a, self.eq)
        self.all_prompts = torch.stack([a, b, eq], -1).reshape(-1, 3).to(device)  # every prompt, [m*m, 3]
        self.all_answers = ((a + b) % modulus).reshape(-1).to(device)

    def draw(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(self.all_answers), (n,), generator=gen)
        return self.all_prompts[idx.to(self.all_prompts.device)], self.all_answers[idx.to(self.all_prompts.device)]

    @staticmethod
    def reward(completions: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
        """The verifier: 1.0 when the first completion token is the answer. Length plays no part."""
        return (completions[:, 0] == answers).float()


class Policy(torch.nn.Module):
    """A tiny autoregressive language model: embedding, one GRU layer, linear head."""

    def __init__(self, vocab: int, dim: int, hidden: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.rnn = torch.nn.GRU(dim, hidden, batch_first=True)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor, h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out, h = self.rnn(self.embed(ids), h)
        return self.head(out), h


@torch.no_grad()
def sample(policy: Policy, prompts: torch.Tensor, group: int, max_len: int, eos: int,
           gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``group`` completions per prompt (contiguous), temperature 1.

    Returns the completions ``[B, max_len]`` (EOS after the end), their lengths (EOS included) and
    whether each ended with EOS within the budget (False: truncated).
    """
    x = prompts.repeat_interleave(group, 0)
    n = x.shape[0]
    logits, h = policy(x)
    last = logits[:, -1]
    out = torch.full((n, max_len), eos, dtype=torch.long, device=x.device)
    lengths = torch.full((n,), max_len, dtype=torch.long, device=x.device)
    done = torch.zeros(n, dtype=torch.bool, device=x.device)
    for t in range(max_len):
        probs = torch.softmax(last.float(), -1)
        tok = torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(1).to(x.device)
        tok = torch.where(done, torch.full_like(tok, eos), tok)
        out[:, t] = tok
        ended = ~done & (tok == eos)
        lengths = torch.where(ended, torch.full_like(lengths, t + 1), lengths)
        done = done | ended
        if bool(done.all()):
            break
        logits, h = policy(tok[:, None], h)
        last = logits[:, 0]
    return out, lengths, done


def completion_logits(model: Policy, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
    """``[B, T, V]`` logits aligned with the completion tokens (position t scores token t)."""
    seq = torch.cat([prompts, completions], 1)
    logits, _ = model(seq)
    return logits[:, prompts.shape[1] - 1: -1]


def _mean(x: torch.Tensor) -> float | None:
    return float(x.float().mean()) if x.numel() else None


def generate_batch(policy: Policy, task: Task, recipe: rlloss.Recipe, cfg: Config, gen: torch.Generator) -> dict:
    """Sample one training batch; DAPO's dynamic sampling refills it with groups whose rewards differ."""
    G, be = cfg.group, cfg.backend
    kept: list[dict] = []
    n_kept = rounds = sampled_groups = kept_groups = 0
    first: dict | None = None
    while True:
        prompts, answers = task.draw(cfg.prompts, gen)
        comp, lengths, finished = sample(policy, prompts, G, cfg.max_len, task.eos, gen)
        rewards = task.reward(comp, answers.repeat_interleave(G))
        keep = rlloss.dynamic_sampling_mask(rewards, group_size=G, backend=be)
        rounds += 1
        sampled_groups += cfg.prompts
        kept_groups += int(keep.sum()) // G
        part = {"prompts": prompts.repeat_interleave(G, 0), "comp": comp, "lengths": lengths,
                "finished": finished, "rewards": rewards, "keep": keep}
        if first is None:
            first = part
        if not recipe.dynamic_sampling:
            batch = part
            break
        # Dynamic sampling: keep the groups with signal, sample more prompts until the batch is full.
        kept.append({k: v[keep] for k, v in part.items()})
        n_kept += int(keep.sum())
        if n_kept >= cfg.prompts * G or rounds >= cfg.max_rounds:
            batch = {k: torch.cat([p[k] for p in kept])[: cfg.prompts * G] for k in part}
            break
    batch["rounds"], batch["keep_frac"] = rounds, kept_groups / sampled_groups
    batch["samples"] = rounds * cfg.prompts * G
    batch["first"] = first
    return batch


def train_step(policy: Policy, reference: Policy, optimizer: torch.optim.Optimizer, task: Task,
               recipe: rlloss.Recipe, variant: dict[str, Any], cfg: Config, gen: torch.Generator) -> dict[str, Any]:
    """One RL step: sample, score, advantages, ``updates`` optimiser steps with accumulation."""
    G, T, be = cfg.group, cfg.max_len, cfg.backend
    batch = generate_batch(policy, task, recipe, cfg, gen)
    prompts, comp, lengths = batch["prompts"], batch["comp"], batch["lengths"]
    finished, rewards = batch["finished"], batch["rewards"]
    n = comp.shape[0]
    mask = torch.arange(T, device=comp.device) < lengths[:, None]

    # Rewards and advantages with the recipe's preset. DAPO adds the soft overlong penalty to the
    # reward and masks truncated responses out of the loss (overlong filtering).
    shaped = rewards
    if recipe.overlong_max_len is not None and n:
        shaped = rewards + recipe.overlong_penalty(lengths, max_len=T, cache_len=cfg.cache(), backend=be)
    if recipe.overlong_filter:
        mask = mask & finished[:, None]
    sums = {"clip_low": 0.0, "clip_high": 0.0, "kl": 0.0, "loss": 0.0}
    tokens_seen = updates = 0
    f = batch["first"]
    if f is not batch:  # DAPO: the entropy of the sampling policy on the first round, for the log
        with torch.no_grad():
            _, f_entropy = rlloss.token_logprobs(completion_logits(policy, f["prompts"], f["comp"]), f["comp"],
                                                 return_entropy=True, backend=be)
    signal = torch.zeros(0, dtype=torch.bool)
    if n:  # (DAPO's batch is empty when no sampling round found a group with signal)
        adv = recipe.advantages(shaped, group_size=G, backend=be)
        signal = rlloss.dynamic_sampling_mask(rewards, group_size=G, backend=be)

        # old_logp: the sampling policy (the weights before this step's updates); ref_logp: the
        # frozen initial policy (in the loss with the recipe's beta; always measured).
        with torch.no_grad():
            old_logp, entropy = rlloss.token_logprobs(completion_logits(policy, prompts, comp), comp,
                                                      return_entropy=True, backend=be)
            if f is batch:
                f_entropy = entropy
            ref_logp = rlloss.token_logprobs(completion_logits(reference, prompts, comp), comp, backend=be)

        overrides: dict[str, Any] = {"backend": be, **variant}
        if recipe.aggregation == "constant":
            overrides["max_tokens"] = T  # Dr. GRPO: the generation budget
        if cfg.beta is not None:
            overrides["beta"] = cfg.beta

        order = torch.randperm(n, generator=gen).to(comp.device)
        for minibatch in order.chunk(cfg.updates):  # `updates` optimiser steps per sampled batch
            micro = list(minibatch.chunk(cfg.micro))
            # The optimiser step's global counts: summed over its micro-batches (and, under torchrun,
            # all-reduced over ranks), so the summed micro-batch losses are the full step's objective.
            counts = rlloss.distributed.step_counts([mask[idx] for idx in micro])
            optimizer.zero_grad(set_to_none=True)
            for idx in micro:
                logits = completion_logits(policy, prompts[idx], comp[idx])
                logp = rlloss.token_logprobs(logits, comp[idx], backend=be)
                loss, metrics = recipe.loss(logp, old_logp[idx], adv[idx], mask[idx], ref_logp=ref_logp[idx],
                                            **counts.kwargs(), **overrides)
                loss.backward()  # gradients add up over the micro-batches: no division by their number
                k = int(mask[idx].sum())
                tokens_seen += k
                sums["clip_low"] += float(metrics["clip_low"]) * k
                sums["clip_high"] += float(metrics["clip_high"]) * k
                sums["kl"] += float(metrics["kl_mean"]) * k
                sums["loss"] += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
            optimizer.step()
            updates += 1

    # Metrics of the first generation round: the same number of fresh samples for every recipe,
    # before DAPO's filter picks groups (entropy under the sampling policy, i.e. before the updates).
    f_correct = f["rewards"] > 0
    f_mask = torch.arange(T, device=comp.device) < f["lengths"][:, None]
    len_correct, len_incorrect = _mean(f["lengths"][f_correct]), _mean(f["lengths"][~f_correct])
    return {
        "acc": _mean(f_correct),
        "len_correct": len_correct,
        "len_incorrect": len_incorrect,
        "len_gap": None if len_correct is None or len_incorrect is None else len_incorrect - len_correct,
        "len_mean": _mean(f["lengths"]),
        "trunc_frac": _mean(~f["finished"]),
        "entropy": float(f_entropy[f_mask].mean()),
        "entropy_answer": float(f_entropy[:, 0].mean()),
        "clip_low": sums["clip_low"] / max(tokens_seen, 1),
        "clip_high": sums["clip_high"] / max(tokens_seen, 1),
        "kl": sums["kl"] / max(tokens_seen, 1),
        "loss": sums["loss"] / max(updates, 1),
        "keep_frac": batch["keep_frac"],
        "signal_frac": int(signal.sum()) // G / cfg.prompts,  # groups with a gradient / batch size
        "samples": batch["samples"],
        "rounds": batch["rounds"],
    }


@torch.no_grad()
def greedy_accuracy(policy: Policy, task: Task) -> float:
    logits, _ = policy(task.all_prompts)
    return float((logits[:, -1].argmax(-1) == task.all_answers).float().mean())


def train_run(recipe_name: str, seed: int, cfg: Config, progress: Any = None) -> list[dict[str, Any]]:
    """One training run; returns one log row per step. Deterministic in (recipe, seed, cfg, threads)."""
    recipe, variant = RECIPES[recipe_name]
    task = Task(cfg.modulus, cfg.fillers, cfg.device)
    torch.manual_seed(seed)  # the same initial policy for every recipe of a seed
    policy = Policy(task.vocab, cfg.dim, cfg.hidden).to(cfg.device)
    reference = Policy(task.vocab, cfg.dim, cfg.hidden).to(cfg.device)
    reference.load_state_dict(policy.state_dict())
    reference.requires_grad_(False)
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)  # prompts, sampling and mini-batch order
    rows = []
    for step in range(cfg.steps):
        row = {"recipe": recipe_name, "seed": seed, "step": step, "greedy_acc": greedy_accuracy(policy, task)}
        row.update(train_step(policy, reference, optimizer, task, recipe, variant, cfg, gen))
        rows.append(row)
        if progress is not None:
            progress(1)
    return rows


# --------------------------------------------------------------------------------------------------
# compare: every recipe over several seeds, in worker processes


def _run_job(job: tuple[str, int, dict[str, Any], int, Any]) -> tuple[list[dict[str, Any]], float]:
    recipe_name, seed, cfg_dict, threads, queue = job
    torch.set_num_threads(threads)
    start = time.perf_counter()
    rows = train_run(recipe_name, seed, Config(**cfg_dict), progress=queue.put)
    return rows, time.perf_counter() - start


def compare(cfg: Config, recipes: list[str], seeds: list[int], *, workers: int = 2, threads: int = 1,
            show_progress: bool = True, run_seconds: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Run every (recipe, seed); returns the log rows of all runs, in (recipe, seed, step) order.

    ``workers > 1`` runs that many training runs at once in worker processes, ``threads`` torch
    threads each. Wall seconds per run go into ``run_seconds`` when given.
    """
    from tqdm import tqdm

    jobs = [(r, s) for r in recipes for s in seeds]
    bar = tqdm(total=len(jobs) * cfg.steps, desc="compare", unit="step", disable=not show_progress,
               dynamic_ncols=True)
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    seconds: dict[tuple[str, int], float] = {}
    if workers <= 1:
        torch.set_num_threads(threads)
        for r, s in jobs:
            bar.set_postfix_str(f"{LABELS[r]} seed {s}")
            start = time.perf_counter()
            results[(r, s)] = train_run(r, s, cfg, progress=bar.update)
            seconds[(r, s)] = time.perf_counter() - start
    else:
        import concurrent.futures
        import multiprocessing
        import queue as queue_mod

        ctx = multiprocessing.get_context("spawn")
        with ctx.Manager() as manager:
            q = manager.Queue()
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                futures = {pool.submit(_run_job, (r, s, dataclasses.asdict(cfg), threads, q)): (r, s)
                           for r, s in jobs}
                pending = set(futures)
                while pending:
                    done, pending = concurrent.futures.wait(pending, timeout=0.2)
                    while True:
                        try:
                            bar.update(q.get_nowait())
                        except queue_mod.Empty:
                            break
                    for fut in done:
                        results[futures[fut]], seconds[futures[fut]] = fut.result()
    bar.close()
    if run_seconds is not None:
        run_seconds.update({f"{r}/seed{s}": round(t, 2) for (r, s), t in seconds.items()})
    return [row for r, s in jobs for row in results[(r, s)]]


def summarise(rows: list[dict[str, Any]], last_frac: float = 0.2) -> dict[str, dict[str, dict[str, float]]]:
    """Per recipe and metric: the mean over the last ``last_frac`` of steps, then mean/std/min/max over seeds."""
    steps = max(r["step"] for r in rows) + 1
    cutoff = steps - max(1, int(round(steps * last_frac)))
    out: dict[str, dict[str, dict[str, float]]] = {}
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        out[recipe] = {}
        for metric in list(PANELS) + ["len_mean", "loss"]:
            per_seed = []
            for seed in sorted({r["seed"] for r in rows if r["recipe"] == recipe}):
                vals = [r[metric] for r in rows if r["recipe"] == recipe and r["seed"] == seed
                        and r["step"] >= cutoff and r[metric] is not None]
                if vals:
                    per_seed.append(sum(vals) / len(vals))
            if per_seed:
                m = sum(per_seed) / len(per_seed)
                sd = math.sqrt(sum((v - m) ** 2 for v in per_seed) / max(len(per_seed) - 1, 1))
                out[recipe][metric] = {"mean": m, "std": sd, "min": min(per_seed), "max": max(per_seed),
                                       "seeds": len(per_seed)}
    return out


def plot(rows: list[dict[str, Any]], path: Path, title: str, smooth: int = 0) -> None:
    """One panel per metric: the mean over seeds (line) and its min-max range (band), recipes overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = max(r["step"] for r in rows) + 1
    smooth = smooth or max(1, steps // 15)
    metrics = list(PANELS)
    ncols = 4
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), sharex=True)
    for ax, metric in zip(axes.flat, metrics):
        for recipe in dict.fromkeys(r["recipe"] for r in rows):
            seeds = sorted({r["seed"] for r in rows if r["recipe"] == recipe})
            curves = []
            for seed in seeds:
                series = [float("nan")] * steps
                for r in rows:
                    if r["recipe"] == recipe and r["seed"] == seed and r[metric] is not None:
                        series[r["step"]] = float(r[metric])
                curves.append(_rolling_nanmean(series, smooth))
            t = torch.tensor(curves, dtype=torch.float64)
            valid = ~torch.isnan(t)
            n_valid = valid.sum(0)
            mean = torch.where(valid, t, torch.zeros_like(t)).sum(0) / n_valid.clamp(min=1)
            mean[n_valid == 0] = float("nan")
            lo = torch.where(valid, t, torch.full_like(t, float("inf"))).min(0).values
            hi = torch.where(valid, t, torch.full_like(t, float("-inf"))).max(0).values
            lo[n_valid == 0], hi[n_valid == 0] = float("nan"), float("nan")
            x = list(range(steps))
            ax.plot(x, mean.tolist(), color=COLORS[recipe], label=LABELS[recipe], lw=1.5,
                    ls=STYLES.get(recipe, "-"))
            ax.fill_between(x, lo.tolist(), hi.tolist(), color=COLORS[recipe], alpha=0.18, lw=0)
        ax.set_title(PANELS[metric], fontsize=9)
        if metric == "kl":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("training step", fontsize=8)
    axes.flat[0].legend(fontsize=8)
    n_seeds = len({r["seed"] for r in rows})
    fig.suptitle(f"{title}\nline: mean over {n_seeds} seeds, band: min-max over seeds; "
                 f"rolling mean over {smooth} steps", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _rolling_nanmean(series: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(series)):
        vals = [v for v in series[max(0, i - window + 1): i + 1] if not math.isnan(v)]
        out.append(sum(vals) / len(vals) if vals else float("nan"))
    return out


def rounded(rows: list[dict[str, Any]], digits: int = 6) -> list[dict[str, Any]]:
    """The log rows with floats to ``digits`` significant digits, as the JSON and CSV logs store them."""
    return [{k: float(f"{v:.{digits}g}") if isinstance(v, float) else v for k, v in row.items()} for row in rows]


def write_logs(rows: list[dict[str, Any]], meta: dict[str, Any], out: Path, name: str) -> dict[str, Any]:
    """``<name>.json``: settings, summary and the log (``columns`` and one ``rows`` list per step and
    run, floats to 6 significant digits; ``load_rows`` reads it back), and the same log as ``<name>.csv``."""
    out.mkdir(parents=True, exist_ok=True)
    rows = rounded(rows)
    columns = list(rows[0])
    record = {**meta, "summary": summarise(rows), "columns": columns}
    head = json.dumps(record, indent=1)[:-2]  # without the closing brace: the rows follow, one per line
    body = ",\n".join("  " + json.dumps([row[c] for c in columns]) for row in rows)
    (out / f"{name}.json").write_text(f'{head},\n "rows": [\n{body}\n ]\n}}\n')
    with open(out / f"{name}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return {**record, "rows": rows}


def load_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The log rows of a JSON log written by ``write_logs``, as dicts."""
    return [dict(zip(record["columns"], values)) for values in record["rows"]]


def print_summary(summary: dict[str, dict[str, dict[str, float]]]) -> None:
    metrics = ["acc", "greedy_acc", "len_correct", "len_incorrect", "len_gap", "trunc_frac", "entropy",
               "entropy_answer", "clip_low", "clip_high", "kl", "keep_frac", "signal_frac", "samples"]
    print("last 20% of steps, mean (min..max) over seeds:")
    print(f"{'metric':<15}" + "".join(f"{LABELS[r]:>27}" for r in summary))
    for m in metrics:
        cells = []
        for r in summary:
            s = summary[r].get(m)
            cells.append(f"{s['mean']:.3f} ({s['min']:.3f}..{s['max']:.3f})" if s else "n/a")
        print(f"{m:<15}" + "".join(f"{c:>27}" for c in cells))


# --------------------------------------------------------------------------------------------------
# command line


def _config_from_args(args: argparse.Namespace) -> Config:
    cfg = Config(**(QUICK if args.quick else {}))
    for field in dataclasses.fields(Config):
        value = getattr(args, field.name, None)
        if value is not None:
            setattr(cfg, field.name, value)
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("compare", "train"):
        p = sub.add_parser(name)
        p.add_argument("--quick", action="store_true", help="a short setting (under a minute): " + json.dumps(QUICK))
        p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
        p.add_argument("--name", default=None, help="file stem of the logs and plot")
        p.add_argument("--threads", type=int, default=1, help="torch threads per run")
        p.add_argument("--no-plot", action="store_true")
        p.add_argument("--no-progress", action="store_true")
        for field in dataclasses.fields(Config):
            ftype = {"int": int, "float": float, "str": str}[str(field.type).split(" ")[0].split("|")[0].strip()]
            choices = {"backend": ["torch", "triton"]}.get(field.name)
            p.add_argument("--" + field.name.replace("_", "-"), dest=field.name, type=ftype, default=None,
                           choices=choices, help=f"default {field.default}")
        if name == "compare":
            p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
            p.add_argument("--recipes", nargs="+", default=MAIN, choices=list(RECIPES))
            p.add_argument("--ablations", action="store_true", help="add " + ", ".join(ABLATIONS))
            p.add_argument("--workers", type=int, default=2, help="runs in parallel (processes)")
        else:
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--recipe", default="dapo", choices=list(RECIPES))
    p = sub.add_parser("plot")
    p.add_argument("log", type=Path)
    args = parser.parse_args(argv)

    if args.command == "plot":
        record = json.loads(args.log.read_text())
        plot(load_rows(record), args.log.with_suffix(".png"), record.get("title", args.log.stem))
        print_summary(record["summary"])
        return 0

    cfg = _config_from_args(args)
    if args.command == "compare":
        recipes = list(dict.fromkeys(args.recipes + (ABLATIONS if args.ablations else [])))
        seeds, workers = args.seeds, args.workers
    else:
        recipes, seeds, workers = [args.recipe], [args.seed], 1
    name = args.name or (args.command + ("-quick" if args.quick else "")
                         + ("-ablations" if args.command == "compare" and args.ablations else "") + (
        f"-{args.recipe}-seed{args.seed}" if args.command == "train" else "")
        + ("-triton" if cfg.backend == "triton" else ""))
    start = time.perf_counter()
    run_seconds: dict[str, float] = {}
    rows = compare(cfg, recipes, seeds, workers=workers, threads=args.threads,
                   show_progress=not args.no_progress, run_seconds=run_seconds)
    seconds = time.perf_counter() - start
    title = (f"{', '.join(LABELS[r] for r in recipes)} on (a+b) mod {cfg.modulus}: {cfg.steps} steps, "
             f"{cfg.prompts} prompts x G={cfg.group}, max_len {cfg.max_len}, backend {cfg.backend}")
    command = "python examples/length_bias.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {"title": title, "command": command, "config": dataclasses.asdict(cfg), "recipes": recipes,
            "seeds": seeds, "workers": workers, "threads": args.threads, "wall_seconds": round(seconds, 1),
            "run_seconds": run_seconds, "torch": torch.__version__, "rlloss": rlloss.__version__,
            "cpu_count": os.cpu_count()}
    record = write_logs(rows, meta, args.out, name)
    if not args.no_plot:
        plot(rows, args.out / f"{name}.png", title)
    print(f"{len(recipes) * len(seeds)} runs in {seconds:.1f} s; logs {args.out / name}.json/.csv"
          + ("" if args.no_plot else f", plot {args.out / name}.png"))
    print_summary(record["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
