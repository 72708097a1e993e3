"""The search space, in the Hydra Optuna sweeper's syntax, as Optuna distributions.

``key=choice(a, b, ...)`` is categorical; ``key=range(start, stop[, step])`` an integer (or
stepped float) distribution over the values Hydra's ``range`` lists, ``stop`` excluded;
``key=interval(low, high)`` uniform between the bounds (Hydra reads them as floats;
``int(interval(low, high))`` is an integer distribution), and ``key=tag(log, interval(low,
high))`` log-uniform; ``shuffle(range(...))`` is categorical.
Any other override (``key=value``, ``+key=value``) is passed to every trial unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    RangeSweep,
    Transformer,
)


@dataclass
class SearchSpace:
    """The searched keys with their distributions, and the overrides every trial gets."""

    distributions: dict[str, Any]  # key -> optuna.distributions.BaseDistribution
    fixed: list[str]

    def overrides(self, params: dict[str, Any]) -> list[str]:
        """One trial's task overrides: ``key=value`` for each searched key, then the fixed."""
        return [f"{key}={encode(params[key])}" for key in self.distributions] + self.fixed


def encode(value: Any) -> str:
    """A sampled value as an override's value (strings come already escaped by Hydra)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _distribution(override: Override) -> Any:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    sweep = override.value()
    key = override.get_key_element()
    if isinstance(sweep, ChoiceSweep) or (isinstance(sweep, RangeSweep) and sweep.shuffle):
        choices: list[Any] = list(override.sweep_iterator(transformer=Transformer.encode))
        for value in choices:
            if not isinstance(value, str | int | float | bool | type(None)):
                raise ValueError(f"{key}: choice() takes plain values, not {value!r}")
        return CategoricalDistribution(choices)
    if isinstance(sweep, RangeSweep):
        values: list[Any] = sorted(override.sweep_iterator())  # type: ignore[type-var]
        if not values:
            raise ValueError(f"{key}: {override.input_line} holds no value")
        step = abs(sweep.step)
        if all(isinstance(v, int) for v in values) and isinstance(step, int):
            return IntDistribution(values[0], values[-1], step=step)
        return FloatDistribution(float(values[0]), float(values[-1]), step=float(step))
    if isinstance(sweep, IntervalSweep):
        log = "log" in sweep.tags
        if isinstance(sweep.start, int) and isinstance(sweep.end, int):
            return IntDistribution(sweep.start, sweep.end, log=log)
        return FloatDistribution(float(sweep.start or 0), float(sweep.end or 0), log=log)
    raise ValueError(f"{key}: {override.input_line} is not a sweep Optuna can search")


def parse(overrides: Sequence[str]) -> SearchSpace:
    """Split ``overrides`` (the sweeper's ``params`` then the command line's) into the searched
    distributions and the fixed overrides; a later override of a key replaces an earlier one."""
    distributions: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.get_key_element()
        distributions.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            distributions[key] = _distribution(override)
        else:
            fixed[key] = str(override.input_line)
    return SearchSpace(distributions, list(fixed.values()))
