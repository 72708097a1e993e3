"""When masks change and to which sparsity: a plan of ``(step, target sparsity)`` updates.

Each schedule is a class here and a yaml in ``conf/method/prune/schedule/`` (chosen with
``method/prune/schedule@method.schedule=<name>``, or the short ``method.schedule=<name>``):

- :class:`OneShot`: one update at step 0 to the final sparsity, then fine-tuning.
- :class:`Iterative`: ``rounds`` updates, one every ``epochs_per_round`` epochs from step 0;
  round k (from 1) prunes to ``1 − (1 − s_f)^(k/rounds)``, the same fraction of the remaining
  weights each round (Han et al. 2015), and leaves ``epochs_per_round`` epochs of fine-tuning.
- :class:`AGP`: Zhu & Gupta 2017, s_t = s_f + (s_i − s_f)(1 − (t − t0)/(n·Δt))³ at
  t = t0, t0 + Δt, …, t0 + n·Δt (``start_epoch`` gives t0, ``frequency`` Δt, ``updates`` n).
- :class:`Linear`: the same update steps with s_t = s_i + (s_f − s_i)(t − t0)/(n·Δt).

A new schedule subclasses :class:`Schedule` and implements :meth:`Schedule.plan`. Steps count
optimizer steps from 0, as :meth:`kdexp.method.base.Method.after_step` sees them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kdexp import choices
from kdexp.errors import ConfigError

GROUP = "method/prune/schedule"
KEY = "method.schedule"
# The schedule knobs that used to sit flat under method (method.frequency, ...).
LEGACY_KNOBS = (
    "initial_sparsity",
    "start_epoch",
    "frequency",
    "updates",
    "rounds",
    "epochs_per_round",
)


@dataclass
class Schedule:
    """Base of the pruning schedules: :meth:`plan` gives the ``(step, target)`` mask updates.

    ``name`` titles the sparsity plot; ``counts_rounds`` adds the ``prune/round`` metric.
    """

    name: ClassVar[str] = "schedule"
    counts_rounds: ClassVar[bool] = False
    # The config key of each parameter, for error messages (method.frequency when given flat).
    keys: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def key(self, name: str) -> str:
        """The config key the user set ``name`` with."""
        return self.keys.get(name, f"{KEY}.{name}")

    def plan(
        self, sparsity: float, *, total_steps: int, steps_per_epoch: int, epochs: int
    ) -> list[tuple[int, float]]:
        """The ``(step, target sparsity)`` updates; ConfigError when they do not fit the run."""
        raise NotImplementedError

    def _positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(self.key(name), value, "a positive integer")


@dataclass
class OneShot(Schedule):
    """Prune to the final sparsity at step 0, then fine-tune."""

    name: ClassVar[str] = "oneshot"

    def plan(
        self, sparsity: float, *, total_steps: int, steps_per_epoch: int, epochs: int
    ) -> list[tuple[int, float]]:
        return [(0, sparsity)]


@dataclass
class Iterative(Schedule):
    """Han et al. 2015: ``rounds`` prune/fine-tune rounds of ``epochs_per_round`` epochs each,
    round k pruning to 1 − (1 − s_f)^(k/rounds)."""

    name: ClassVar[str] = "iterative"
    counts_rounds: ClassVar[bool] = True
    rounds: int = 3
    epochs_per_round: int = 1

    def plan(
        self, sparsity: float, *, total_steps: int, steps_per_epoch: int, epochs: int
    ) -> list[tuple[int, float]]:
        self._positive("rounds", "epochs_per_round")
        if self.rounds * self.epochs_per_round > epochs:
            raise ConfigError(
                self.key("rounds"),
                self.rounds,
                f"rounds × epochs_per_round ({self.epochs_per_round}) within schedule.epochs "
                f"({epochs}): each round is followed by epochs_per_round epochs of fine-tuning",
            )
        return [
            (
                k * self.epochs_per_round * steps_per_epoch,
                1.0 - (1.0 - sparsity) ** ((k + 1) / self.rounds),
            )
            for k in range(self.rounds)
        ]


def agp_sparsity(t: int, s_i: float, s_f: float, t0: int, n: int, dt: int) -> float:
    """Zhu & Gupta's cubic ramp at step ``t`` (clamped to [t0, t0 + n·Δt])."""
    progress = min(max((t - t0) / (n * dt), 0.0), 1.0)
    return s_f + (s_i - s_f) * (1.0 - progress) ** 3


@dataclass
class AGP(Schedule):
    """Zhu & Gupta 2017 (automated gradual pruning): updates at t0 + i·Δt, i = 0..n, to
    s_t = s_f + (s_i − s_f)(1 − (t − t0)/(n·Δt))³."""

    name: ClassVar[str] = "agp"
    initial_sparsity: float = 0.0
    start_epoch: int = 0
    frequency: int = 10
    updates: int = 20

    def target(self, i: int, sparsity: float) -> float:
        """The target of update ``i`` (of ``updates``)."""
        return agp_sparsity(i, self.initial_sparsity, sparsity, 0, self.updates, 1)

    def plan(
        self, sparsity: float, *, total_steps: int, steps_per_epoch: int, epochs: int
    ) -> list[tuple[int, float]]:
        self._positive("frequency", "updates")
        start, initial = self.start_epoch, self.initial_sparsity
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ConfigError(self.key("start_epoch"), start, "a non-negative integer")
        if not 0 <= initial <= sparsity:
            raise ConfigError(
                self.key("initial_sparsity"), initial, f"a value in [0, sparsity={sparsity}]"
            )
        t0 = start * steps_per_epoch
        last = t0 + self.updates * self.frequency
        if last > total_steps - 1:
            updates, frequency = self.key("updates"), self.key("frequency")
            raise ConfigError(
                updates,
                self.updates,
                f"updates that fit the run: the last one is at step start_epoch·steps_per_epoch + "
                f"updates·frequency = {t0} + {self.updates}·{self.frequency} = {last}, but the run "
                f"has {total_steps} steps (schedule.epochs {epochs} × {steps_per_epoch} per "
                f"epoch, the last being {total_steps - 1}); lower {updates}, {frequency} or "
                f"{self.key('start_epoch')}, or raise schedule.epochs",
            )
        return [
            (t0 + i * self.frequency, self.target(i, sparsity)) for i in range(self.updates + 1)
        ]


@dataclass
class Linear(AGP):
    """AGP's update steps with a straight ramp: s_t = s_i + (s_f − s_i)(t − t0)/(n·Δt)."""

    name: ClassVar[str] = "linear"

    def target(self, i: int, sparsity: float) -> float:
        s_i = self.initial_sparsity
        return s_i + (sparsity - s_i) * i / self.updates


def build_schedule(schedule: Any, legacy: Mapping[str, Any] | None = None) -> Schedule:
    """The :class:`Schedule` that ``method.schedule`` gives (a name, a node or an object), with
    the old flat knobs (``method.frequency``, ...) that are set applied to it, each warned about
    once with the key that replaces it."""
    built = choices.build(schedule, GROUP, KEY)
    if not isinstance(built, Schedule):
        raise ConfigError(
            KEY,
            schedule,
            f"one of {', '.join(choices.options(GROUP))}, or a node whose _target_ is a "
            "kdexp.method.prune.schedule.Schedule",
        )
    given = {k: v for k, v in (legacy or {}).items() if v is not None}
    if given:
        built = dataclasses.replace(built) if dataclasses.is_dataclass(built) else built
    for name, value in given.items():
        if hasattr(built, name) and not name.startswith("_"):
            choices.warn_once(
                f"method.{name}", f"method.{name} is deprecated: use {KEY}.{name}={value}"
            )
            setattr(built, name, value)
            built.keys[name] = f"method.{name}"
        else:
            choices.warn_once(
                f"method.{name}",
                f"method.{name}={value} has no effect with the {built.name} schedule "
                f"(its parameters are under {KEY})",
            )
    return built


def plan(
    schedule: Any,
    sparsity: float,
    *,
    total_steps: int,
    steps_per_epoch: int,
    epochs: int,
    **knobs: Any,
) -> list[tuple[int, float]]:
    """The ``(step, target)`` updates of ``schedule`` (a name or a :class:`Schedule`) with the
    flat ``knobs`` of old (``frequency=...``); kept for callers of the string API."""
    return build_schedule(schedule, knobs).plan(
        sparsity, total_steps=total_steps, steps_per_epoch=steps_per_epoch, epochs=epochs
    )
