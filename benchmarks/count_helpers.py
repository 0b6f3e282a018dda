"""Kernel launches and memory traffic of the off-policy helpers and advantage estimators, counted.

Each public function is called once, as a user calls it (its argument checks included), under
``traffic.count_torch_ops``: every aten op that computes counts as one launch and moves the bytes
of its tensor inputs and outputs; ``.item()``-style reads back to the host count as syncs. The
helpers are one call per batch on ``[B, T]`` (or ``[N]``) tensors, outside the model's forward and
backward, so these figures say what they add to a step in the eager PyTorch reference:
``minimum bytes`` is every input read once as stored and the output written once; ``ratio`` is how
far the reference's unfused ops are from that (``torch.compile`` fuses them: the references trace
without graph breaks, see ``tests/test_corrections.py`` and ``tests/test_estimators.py``).

Usage::

    python benchmarks/count_helpers.py                # B=64, T=1024, groups of 8, fp32
    python benchmarks/count_helpers.py --b 64 --t 1024 --group 8 --out benchmarks/results/helpers.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import aligned_table  # noqa: E402
from problems import helper_inputs  # noqa: E402
from traffic import count_torch_ops, tensor_bytes  # noqa: E402

import rlloss  # noqa: E402
from rlloss.distributed import top_entropy_mask as global_top_entropy_mask  # noqa: E402


def cases(p: dict[str, Any]) -> list[tuple[str, Callable[[], Any], list[torch.Tensor]]]:
    """(name, call, the tensors it reads): the output is taken from the call itself."""
    old, samp, logp, mask, g = p["old"], p["sampling"], p["logp"], p["mask"], p["group"]
    sc, tr = p["scores"], p["token_rewards"]
    return [
        ("importance_weights token truncate", lambda: rlloss.importance_weights(old, samp, mask, high=2.0),
         [old, samp, mask]),
        ("importance_weights sequence mask +norm", lambda: rlloss.importance_weights(
            old, samp, mask, level="sequence", mode="mask", low=0.5, high=2.0, normalize=True), [old, samp, mask]),
        ("rejection_mask token k1", lambda: rlloss.rejection_mask(logp, samp, mask, high=2.0), [logp, samp, mask]),
        ("rejection_mask seq_mean k3", lambda: rlloss.rejection_mask(logp, samp, mask, kind="k3", level="seq_mean",
                                                                     high=0.01), [logp, samp, mask]),
        ("rejection_mask seq_max k2", lambda: rlloss.rejection_mask(logp, samp, mask, kind="k2", level="seq_max",
                                                                    high=0.01), [logp, samp, mask]),
        ("off_policy_mask", lambda: rlloss.off_policy_mask(logp, samp, p["adv"], mask, threshold=0.01),
         [logp, samp, p["adv"], mask]),
        ("top_entropy_mask", lambda: rlloss.top_entropy_mask(p["entropy"], mask, fraction=0.2), [p["entropy"], mask]),
        ("distributed.top_entropy_mask (1 proc)", lambda: global_top_entropy_mask(
            p["entropy"], mask, fraction=0.2), [p["entropy"], mask]),
        ("whiten", lambda: rlloss.whiten(old, mask), [old, mask]),
        ("discounted_returns gamma=1", lambda: rlloss.discounted_returns(tr, mask), [tr, mask]),
        ("discounted_returns gamma=0.99", lambda: rlloss.discounted_returns(tr, mask, gamma=0.99), [tr, mask]),
        ("reinforce_pp_advantages", lambda: rlloss.reinforce_pp_advantages(tr, mask), [tr, mask]),
        ("reinforce_pp_baseline_advantages", lambda: rlloss.reinforce_pp_baseline_advantages(sc, mask=mask, group_size=g),
         [sc, mask]),
        ("remax_advantages", lambda: rlloss.remax_advantages(tr, mask, p["baseline"]), [tr, mask, p["baseline"]]),
        ("opo_advantages", lambda: rlloss.opo_advantages(sc, mask=mask, group_size=g), [sc, mask]),
        ("opo_advantages (group ids)", lambda: rlloss.opo_advantages(sc, p["ids"], mask), [sc, p["ids"], mask]),
        ("gpg_advantages", lambda: rlloss.gpg_advantages(sc, mask=mask, group_size=g), [sc, mask]),
        ("passk_advantages", lambda: rlloss.passk_advantages(sc, mask=mask, group_size=g), [sc, mask]),
        ("gdpo_advantages (K=3)", lambda: rlloss.gdpo_advantages(p["scores_k"], mask=mask, group_size=g), [p["scores_k"], mask]),
        ("optimal_token_baseline_advantages", lambda: rlloss.optimal_token_baseline_advantages(
            tr, mask, old_logp=old, sum_pi_squared=p["sum_pi_squared"], group_size=g), [tr, mask, old, p["sum_pi_squared"]]),
        ("group_advantages (N=B, for scale)", lambda: rlloss.group_advantages(sc, group_size=g, backend="torch"), [sc]),
    ]


def _mib(n: int) -> str:
    return f"{n / 2**20:,.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--b", type=int, default=64, help="rows / sequences (default 64)")
    parser.add_argument("--t", type=int, default=1024, help="tokens per row (default 1024)")
    parser.add_argument("--group", type=int, default=8, help="samples per prompt (default 8)")
    parser.add_argument("--out", type=Path, default=None, help="also write the counts as JSON here")
    args = parser.parse_args(argv)
    if args.b % args.group:
        parser.error("--group must divide --b")

    started = time.perf_counter()
    p = helper_inputs(args.b, args.t, args.group)
    rows = []
    for name, call, inputs in cases(p):
        call()  # once outside the count (no first-call effects in eager torch, but keep it honest)
        out: list[Any] = []
        counts = count_torch_ops(lambda: out.append(call()))
        floor = sum(tensor_bytes(x) for x in inputs) + tensor_bytes(out[0])
        rows.append({"function": name, "launches": counts.n_launches, "syncs": counts.syncs, "bytes": counts.bytes,
                     "minimum_bytes": floor, "ratio": counts.bytes / floor})
    elapsed = time.perf_counter() - started

    print(f"eager PyTorch reference, one call each, B={args.b} T={args.t} groups of {args.group}, fp32 inputs, "
          f"prefix mask; counted (aten ops via TorchDispatchMode)")
    head = ("function", "launches", "syncs", "MiB moved", "minimum MiB", "ratio")
    body = [(r["function"], str(r["launches"]), str(r["syncs"]), _mib(r["bytes"]), _mib(r["minimum_bytes"]),
             f"{r['ratio']:.1f}x") for r in rows]
    print(aligned_table(head, body, ["<", ">", ">", ">", ">", ">"]))
    print(f"(minimum: each input read once as stored, the output written once; counted in {elapsed:.1f} s)")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"b": args.b, "t": args.t, "group": args.group, "torch": torch.__version__, "seconds": elapsed}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
