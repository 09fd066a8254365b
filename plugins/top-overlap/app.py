"""top-overlap: a kl-proxy comparator written in Python (built with componentize-py).

Per-position series, NaN where the position is not aligned or a top list is empty:
- top_overlap: |topN(main) ∩ topN(candidate)| / N, N the longer of the two lists.
- entropy_diff: entropy of the candidate's top-N list minus the main's, each list renormalised
  to sum to 1 (nats). Positive: the candidate is less sure than the main model.
Scalar: top_overlap_mean, the mean of top_overlap where it is defined.

Options (JSON): {"emit": ["top_overlap", ...]} chooses the metrics returned (default: all).

Build: `make -C plugins top-overlap` (componentize-py, generated bindings are not kept).
"""

import json
import math

import wit_world
from wit_world.imports import host
from wit_world.imports.types import (
    Comparison,
    Metric,
    PositionStatus,
    Value_PerPosition,
    Value_Scalar,
)
from componentize_py_types import Err

METRICS = {
    "top_overlap": "Share of the top-N tokens both models list, per position",
    "entropy_diff": "Entropy of the candidate's renormalised top-N minus the main's (nats)",
    "top_overlap_mean": "Mean of top_overlap over the positions where it is defined",
}

_emit = set(METRICS)


def _entropy(top):
    probs = [math.exp(t.logprob) for t in top]
    total = sum(probs)
    if total <= 0.0:
        return math.nan
    return -sum((p / total) * math.log(p / total) for p in probs if p > 0.0)


class WitWorld(wit_world.WitWorld):
    def configure(self, options: str) -> None:
        global _emit
        try:
            opts = json.loads(options) if options.strip() not in ("", "null") else {}
        except ValueError as e:
            raise Err(f"top-overlap options: {e}")
        if not isinstance(opts, dict):
            raise Err("top-overlap options: expected a JSON object")
        unknown = set(opts) - {"emit"}
        if unknown:
            raise Err(f"top-overlap options: unknown keys {sorted(unknown)}")
        emit = opts.get("emit", list(METRICS))
        bad = [m for m in emit if m not in METRICS]
        if bad:
            raise Err(f"top-overlap options: emit: unknown metrics {bad} (known: {list(METRICS)})")
        _emit = set(emit)

    def compare(self, c: Comparison) -> list[Metric]:
        overlap, ent = [], []
        for p in c.positions:
            if p.status != PositionStatus.ALIGNED or not p.main_top or not p.candidate_top:
                overlap.append(math.nan)
                ent.append(math.nan)
                continue
            n = max(len(p.main_top), len(p.candidate_top))
            common = {t.id for t in p.main_top} & {t.id for t in p.candidate_top}
            overlap.append(len(common) / n)
            ent.append(_entropy(p.candidate_top) - _entropy(p.main_top))
        defined = [v for v in overlap if not math.isnan(v)]
        mean = sum(defined) / len(defined) if defined else math.nan
        if not defined and c.positions:
            host.log(host.Level.DEBUG, f"top-overlap: no aligned position in {c.id}")
        values = {
            "top_overlap": Value_PerPosition(overlap),
            "entropy_diff": Value_PerPosition(ent),
            "top_overlap_mean": Value_Scalar(mean),
        }
        return [Metric(name, METRICS[name], values[name]) for name in METRICS if name in _emit]
