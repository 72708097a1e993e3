"""Runs grouped into configurations, and the Pareto fronts of accuracy against cost.

Runs that differ only in their seed (and in how they were executed or recorded) form one
configuration, a :class:`Row`, with the mean and std of each metric over its runs. The report
(:mod:`kdexp.report`) writes them as tables, its figures (:mod:`kdexp.report_plots`) draw them.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kdexp.config import EXECUTION_KEYS, canonical_text
from kdexp.tracking.query import RunRecord

#: Top-level keys whose params do not make a configuration different: the seed, and how a run
#: is executed or recorded.
_IGNORED = ("seed", *EXECUTION_KEYS)

#: (column, metric) pairs of the table; accuracies are in %.
COLUMNS = (
    ("test/acc1", "test/acc1"),
    ("best val/acc1", "best/val_acc1"),
    ("last val/acc1", "last/val_acc1"),
    ("params", "model/params"),
    ("nonzero params", "model/nonzero_params"),
    ("size (bytes)", "model/size_bytes"),
    ("compressed (bytes)", "model/compressed_bytes"),
    ("compression ratio", "model/compression_ratio"),
    ("latency (ms)", "model/latency_ms"),
    ("FLOPs", "model/flops"),
)


@dataclass
class Row:
    """One configuration: its label, its runs, and mean and std of each metric over them."""

    label: str
    runs: list[RunRecord]
    mean: dict[str, float]
    std: dict[str, float]


def pruned(run: RunRecord) -> str | None:
    """The epochs a search trial trained before its pruner stopped it (:mod:`kdexp.search`)."""
    return run.tags.get("kdexp.pruned")


def config_key(run: RunRecord) -> str:
    kept: dict[str, str | None] = {
        k: canonical_text(v) for k, v in run.params.items() if k.split(".")[0] not in _IGNORED
    }
    kept["kdexp.pruned"] = pruned(run)  # a pruned run is not a finished one of its config
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def group(runs: Sequence[RunRecord]) -> list[Row]:
    """Group runs by configuration (all params but the seed) and aggregate their metrics.

    A row is labelled method/model/dataset (and teacher); where several configurations share
    that label, the params that tell them apart are appended, and ``[pruned at epoch N]``
    marks a search trial its pruner stopped.
    """
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault(config_key(run), []).append(run)
    by_label: dict[str, list[list[RunRecord]]] = {}
    for members in groups.values():
        tags = members[0].tags
        parts = [tags.get(k, "?") for k in ("method", "model", "dataset")]
        if "teacher" in tags:
            parts.append(f"teacher {tags['teacher']}")
        by_label.setdefault(" / ".join(parts), []).append(members)
    rows = []
    for label, configs in by_label.items():
        varying = varying_params([members[0] for members in configs]) if len(configs) > 1 else []
        for members in configs:
            params = members[0].params
            extra = [f"{k}={canonical_text(params[k])}" for k in varying if k in params]
            if pruned(members[0]) is not None:
                extra.append(f"[pruned at epoch {pruned(members[0])}]")
            rows.append(_aggregate(" ".join([label, *extra]), members))
    return sorted(rows, key=lambda r: -r.mean.get("test/acc1", float("-inf")))


def varying_params(representatives: list[RunRecord]) -> list[str]:
    """Params whose value differs between configurations (what tells the rows apart)."""
    keys = sorted({k for r in representatives for k in r.params if k.split(".")[0] not in _IGNORED})
    return [
        k
        for k in keys
        if not k.endswith("_target_")
        and len({canonical_text(r.params.get(k, "")) for r in representatives}) > 1
    ]


def _aggregate(label: str, runs: list[RunRecord]) -> Row:
    mean, std = {}, {}
    for _, metric in COLUMNS:
        values = [r.metrics[metric] for r in runs if metric in r.metrics]
        if values:
            mean[metric] = statistics.fmean(values)
            std[metric] = statistics.stdev(values) if len(values) > 1 else 0.0
    return Row(label, runs, mean, std)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates, by increasing x.

    A point (x, y) is dominated when another has x' <= x (cost) and y' >= y (accuracy), one of
    them strictly. Equal points do not dominate each other, so both stay on the front.
    One pass over the points sorted by cost (n log n: a store of thousands of configurations):
    a point is on the front when it is the most accurate at its cost and more accurate than
    every cheaper point.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front: list[int] = []
    cheaper_best = float("-inf")  # the best accuracy among strictly cheaper points
    start = 0
    while start < len(order):
        x = points[order[start]][0]
        end = start
        while end < len(order) and points[order[end]][0] == x:
            end += 1
        top = points[order[start]][1]  # the most accurate at this cost
        if top > cheaper_best:
            front.extend(i for i in order[start:end] if points[i][1] == top)
        cheaper_best = max(cheaper_best, top)
        start = end
    return front


def _density(row: Row) -> float | None:
    if "model/params" not in row.mean or "model/nonzero_params" not in row.mean:
        return None
    return row.mean["model/nonzero_params"] / row.mean["model/params"]


#: ``--size``: the basis of the size axis, as (axis label, short name, metric). ``dense`` is the
#: state_dict as torch.save writes it (zeros included); ``compressed``, the :mod:`kdexp.compress`
#: format (sparse layout, values at their bit width, entropy-coded).
SIZE_BASES = {
    "dense": ("model size, torch.save (bytes)", "size_bytes", "model/size_bytes"),
    "compressed": ("model size, compressed (bytes)", "compressed_bytes", "model/compressed_bytes"),
}


def costs(size: str = "dense") -> tuple[tuple[str, str, Callable[[Row], float | None]], ...]:
    """(axis label, short name, cost) of the accuracy-against-cost plots and of ``pareto.csv``,
    with model size on the ``size`` basis of :data:`SIZE_BASES`."""
    label, name, metric = SIZE_BASES[size]
    return (
        ("parameters", "params", lambda r: r.mean.get("model/params")),
        (label, name, lambda r: r.mean.get(metric)),
        ("latency at batch 1 (ms)", "latency_ms", lambda r: r.mean.get("model/latency_ms")),
        ("density (nonzero / params)", "density", _density),
    )


#: Metrics ``--accuracy`` may put on the y axis (all are aggregated as table columns).
ACCURACIES = ("test/acc1", "best/val_acc1", "last/val_acc1")


def fronts(
    rows: Sequence[Row], accuracy: str = "test/acc1", size: str = "dense"
) -> dict[str, list[tuple[Row, float]]]:
    """For each cost of :func:`costs` (size on the ``size`` basis), the rows on the Pareto front
    of ``accuracy`` against it, each with its cost, by increasing cost. Pruned search trials are
    left out: their accuracy is that of an unfinished run (Optuna leaves them off its front too).
    """
    found = {}
    for _, name, cost in costs(size):
        kept = [r for r in rows if accuracy in r.mean and pruned(r.runs[0]) is None]
        measured = [(r, cost(r)) for r in kept]
        usable = [(r, x) for r, x in measured if x is not None]
        points = [(x, r.mean[accuracy]) for r, x in usable]
        found[name] = [(usable[i][0], points[i][0]) for i in pareto_front(points)]
    return found
