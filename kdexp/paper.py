"""Measured beside published: a preset's runs grouped by arm, next to its paper's figures.

A preset that reproduces a paper carries a ``paper`` node (citation, data, metric, and the
published value per arm under ``arms``) and labels each run with its ``arm`` (teacher, student,
distilled; dense, pruned; fp32, ptq, qat). Both are logged as params (``paper.citation``,
``paper.arms.<arm>``, ``arm``); :func:`paper_rows` reads them back and :func:`paper_table` prints,
per arm, the test accuracy of the best-validation weights (mean ± sample std over seeds, and each
seed's value), the best-epoch and last-epoch validation accuracy apart, the published value and
the difference measured − published. ``kdexp-report --paper`` prints it.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from kdexp.comparison import config_key, varying_params
from kdexp.tables import markdown_table
from kdexp.tracking.query import RunRecord

#: (column, metric) of the measured part of the table.
MEASURED = (
    ("test/acc1", "test/acc1"),
    ("best val/acc1", "best/val_acc1"),
    ("last val/acc1", "last/val_acc1"),
)


@dataclass
class PaperRow:
    """One arm of one preset: its runs' values per metric, and the published value."""

    citation: str
    arm: str
    seeds: list[str]
    values: dict[str, list[float]]
    published: float | None
    metric: str
    compression: list[float]  # parameters / nonzero parameters, per run


def paper_rows(runs: Sequence[RunRecord]) -> list[PaperRow]:
    """The runs that carry a ``paper.citation`` param, grouped by citation and ``arm``.

    Within an arm, runs are ordered by seed. Runs without a citation are left out.
    """

    groups: dict[tuple[str, str, str], list[RunRecord]] = {}
    for run in runs:
        citation = run.params.get("paper.citation")
        if citation is None:
            continue
        arm = run.params.get("arm") or run.tags.get("method", "?")
        if run.tags.get("kdexp.trained_for"):  # an input trained for another run (a source)
            arm = f"{run.tags['method']} trained as {run.tags['kdexp.trained_for']}"
        groups.setdefault((citation, arm, config_key(run)), []).append(run)
    # An arm run under more than one configuration is one row per configuration, labelled with
    # the params that tell them apart.
    per_arm: dict[tuple[str, str], list[RunRecord]] = {}
    for (citation, arm, _), members in groups.items():
        per_arm.setdefault((citation, arm), []).append(members[0])
    rows = []
    for (citation, arm, _), members in groups.items():
        others = per_arm[(citation, arm)]
        if len(others) > 1:
            varying = varying_params(others)
            arm = " ".join([arm, *(f"{k}={members[0].params.get(k)}" for k in varying)])
        members.sort(key=lambda r: _seed_order(r.params.get("seed", "")))
        metric = members[0].params.get("paper.metric", "test/acc1")
        published = members[0].params.get(f"paper.arms.{members[0].params.get('arm')}")
        rows.append(
            PaperRow(
                citation=citation,
                arm=arm,
                seeds=[r.params.get("seed", "?") for r in members],
                values={m: [r.metrics[m] for r in members if m in r.metrics] for _, m in MEASURED},
                compression=[
                    r.metrics["model/params"] / r.metrics["model/nonzero_params"]
                    for r in members
                    if r.metrics.get("model/nonzero_params") and "model/params" in r.metrics
                ],
                published=_number(published),
                metric=metric,
            )
        )
    return sorted(rows, key=lambda r: (r.citation, r.arm))


def _seed_order(seed: str) -> tuple[int, str]:
    return (int(seed), "") if seed.lstrip("-").isdigit() else (0, seed)


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "None", "null") else None
    except ValueError:
        return None


def mean_std(values: Sequence[float]) -> str:
    """``mean ± sample std`` to two decimals; the mean alone for a single value; — for none."""
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def paper_table(rows: Sequence[PaperRow]) -> str:
    """A Markdown table per cited paper: measured (mean ± std over seeds) beside published."""

    header = [
        "arm",
        "seeds",
        "test/acc1 (best-val weights)",
        "per seed",
        "best val/acc1",
        "last val/acc1",
        "params / nonzero",
        "published",
        "measured − published",
    ]
    blocks = []
    for citation in dict.fromkeys(r.citation for r in rows):
        lines = []
        for row in (r for r in rows if r.citation == citation):
            test = row.values.get(row.metric) or row.values["test/acc1"]
            difference = (
                f"{statistics.mean(test) - row.published:+.2f}"
                if test and row.published is not None
                else "—"
            )
            lines.append(
                [
                    row.arm,
                    str(len(row.seeds)),
                    mean_std(test),
                    ", ".join(f"{v:.2f}" for v in test),
                    mean_std(row.values["best/val_acc1"]),
                    mean_std(row.values["last/val_acc1"]),
                    f"{statistics.mean(row.compression):.1f}×" if row.compression else "—",
                    "—" if row.published is None else f"{row.published:.2f}",
                    difference,
                ]
            )
        blocks.append(f"Published: {citation}\n\n{markdown_table(header, lines)}")
    return "\n\n".join(blocks)
