"""Which configurations a report's plots name: the label policy that keeps a plot readable at any
number of runs (issue 15).

A plot of thousands of configurations cannot carry thousands of labels or legend entries. The
plots name the Pareto front of each cost and the most accurate configurations; every other
configuration is a plain point, and the curve plots draw the named ones only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol


class _Ranked(Protocol):
    label: str
    mean: dict[str, float]


#: The most accurate configurations named on every plot, and the most names a plot carries.
BEST = 5
MOST = 15


def named(
    rows: Sequence[_Ranked],
    front: Iterable[_Ranked],
    accuracy: str,
    best: int = BEST,
    most: int = MOST,
) -> set[str]:
    """The labels of the rows a plot names: the ``best`` most accurate, then the rows of ``front``
    (most accurate first), at most ``most`` in all; every row when there are no more."""
    if len(rows) <= most:
        return {r.label for r in rows}
    ranked = sorted((r for r in rows if accuracy in r.mean), key=lambda r: -r.mean[accuracy])
    chosen = [r.label for r in ranked[:best]]
    on_front = sorted((r for r in front if accuracy in r.mean), key=lambda r: -r.mean[accuracy])
    for row in on_front:
        if len(chosen) >= most:
            break
        if row.label not in chosen:
            chosen.append(row.label)
    return set(chosen[:most])
