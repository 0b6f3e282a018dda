"""The benchmark's last screen: per recipe, each rlloss contender against the best peer.

A pure function of the JSON record (``bench_loss.py`` writes it; a committed record can be
summarised again: ``python benchmarks/summary.py benchmarks/results/bench-cpu.json``). Contenders
whose name starts with ``rlloss`` are rlloss's; every other one is a peer. For each case the best
peer is the one with the lowest median total (forward + backward) time, and each rlloss
contender's speed-up over it is ``spread.Ratio``: the peer's total over rlloss's, with the range
their quartiles allow; ``?`` marks a ratio too noisy to mean anything (``spread.NOISY_RATIO``).

Cases: the policy loss per recipe as published (KL term only where the recipe has one) and dtype,
at the largest size the run measured; the from-hidden-states problem at its measured size (its
contenders as the record holds them); the from-logits problem, where a peer ran.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from spread import NOISY_RATIO, Ratio, Spread, noisy_warning

TOTAL = "fwd+bwd"


def is_rlloss(name: str) -> bool:
    return name.startswith("rlloss")


def ms_text(ms: float) -> str:
    """3 significant figures, no exponent: 0.512, 14.8, 9860."""
    return f"{ms:.3g}" if ms < 1000 else f"{ms:.0f}"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One speed-up of the summary: ``contender`` against ``peer`` in ``case`` of ``part``."""

    part: str
    case: str
    peer: str
    peer_ms: float
    contender: str
    ratio: Ratio

    def to_json(self) -> dict[str, Any]:
        r = self.ratio
        return {"part": self.part, "case": self.case, "peer": self.peer, "peer_ms": self.peer_ms,
                "contender": self.contender, "speedup": r.median, "speedup_low": r.low, "speedup_high": r.high,
                "noisy": r.noisy}


def _total(row: Mapping[str, Any]) -> Spread:
    """A row's total time with its spread; a record without one (an older record) has no spread."""
    if "spread" in row:
        spread = row["spread"]
        return Spread.from_dict(spread[TOTAL] if TOTAL in spread else spread)
    ms = row["ms"][TOTAL] if isinstance(row["ms"], Mapping) else row["ms"]
    return Spread(ms, ms, ms, ms, ms, 1)


def _against_best_peer(part: str, case: str, rows: Mapping[str, Mapping[str, Any]]) -> list[Entry]:
    timed = {name: _total(row) for name, row in rows.items() if "ms" in row}
    peers = {n: s for n, s in timed.items() if not is_rlloss(n)}
    if not peers:
        return []
    peer = min(peers, key=lambda n: peers[n].median)
    return [Entry(part, case, peer, peers[peer].median, n, Ratio.of(peers[peer], s))
            for n, s in timed.items() if is_rlloss(n)]


def entries(record: Mapping[str, Any], published_kl: Mapping[str, bool]) -> list[Entry]:
    """Every speed-up of the summary, from the record; ``published_kl``: recipe -> whether it has a
    KL term as published."""
    out: list[Entry] = []
    rows = [r for r in record.get("rows", []) if r["kl"] == published_kl.get(r["recipe"], r["kl"])]
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        for dtype in dict.fromkeys(r["dtype"] for r in rows):
            here = [r for r in rows if (r["recipe"], r["dtype"]) == (recipe, dtype)]
            if not here:
                continue
            biggest = max(r["b"] * r["t"] for r in here)
            at = {r["contender"]: r for r in here if r["b"] * r["t"] == biggest}
            some = next(iter(at.values()))
            kl = " +KL" if some["kl"] else ""
            out += _against_best_peer("policy loss", f"{recipe}{kl} {dtype} {some['b']}x{some['t']}", at)
    hidden = record.get("hidden")
    if hidden:
        size = " ".join(f"{k}={v}" for k, v in hidden.get("measured_size", {}).items())
        out += _against_best_peer("from hidden states", f"bf16 {size}", hidden.get("measured", {}))
    for size in dict.fromkeys((r["tokens"], r["vocab"]) for r in record.get("logits_rows", [])):
        at = {r["contender"]: r for r in record["logits_rows"] if (r["tokens"], r["vocab"]) == size}
        out += _against_best_peer("from logits", f"bf16 {size[0]} tokens V={size[1]}", at)
    return out


def render(record: Mapping[str, Any], found: list[Entry]) -> str:
    """The summary as text: one block per part, one line per case, a column per rlloss contender."""
    env = record.get("environment", {})
    kind = env.get("kind", "measured")
    threads = ""
    if "policy_loss_threads" in env:
        threads = f", the policy loss on {env['policy_loss_threads']} thread(s), the rest on {env.get('threads')}"
    lines = [f"SUMMARY ({kind}{threads}, device {env.get('device', '?')}, "
             f"{env.get('date', '')[:10]}): speed-up = the best peer's median forward+backward time / rlloss's "
             "(> 1: rlloss faster), [low-high] from their quartiles, ? = too noisy (range wider than "
             f"{NOISY_RATIO:g}x)."]
    for part in dict.fromkeys(e.part for e in found):
        mine = [e for e in found if e.part == part]
        names = list(dict.fromkeys(e.contender for e in mine))
        head = [part, "best peer (ms)", *names]
        body = []
        for case in dict.fromkeys(e.case for e in mine):
            row = {e.contender: e for e in mine if e.case == case}
            first = next(iter(row.values()))
            body.append([case, f"{first.peer} ({ms_text(first.peer_ms)})", *(str(row[n].ratio) if n in row else "-"
                                                                          for n in names)])
        widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
        lines.append("")
        lines += ["  ".join(f"{c:<{w}}" if i < 2 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(line, widths)))
                  for line in [head, *body]]
    timed_parts = {"policy loss": "rows", "from logits": "logits_rows"}
    for part, key in timed_parts.items():
        if record.get(key) and part not in {e.part for e in found}:
            ran = ", ".join(dict.fromkeys(r["contender"] for r in record[key]))
            lines.append(f"\n{part}: no peer ran on this machine (ran: {ran}); why: 'this run left out' above")
    warning = noisy_warning([e.ratio for e in found], "speed-ups")
    if warning:
        lines.append("\n" + warning)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Summarise a record again: ``python benchmarks/summary.py RECORD.json``."""
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("record", type=Path)
    args = parser.parse_args(argv)
    record = json.loads(args.record.read_text())
    print(render(record, entries(record, record.get("published_kl", {}))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
