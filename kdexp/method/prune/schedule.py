"""When masks change and to which sparsity: a plan of ``(step, target sparsity)`` updates.

- ``oneshot``: one update at step 0 to the final sparsity, then fine-tuning.
- ``iterative``: ``rounds`` updates, one every ``epochs_per_round`` epochs from step 0; round k
  (from 1) prunes to ``1 − (1 − s_f)^(k/rounds)``, the same fraction of the remaining weights
  each round (Han et al. 2015), and leaves ``epochs_per_round`` epochs of fine-tuning after it.
- ``agp``: Zhu & Gupta 2017, s_t = s_f + (s_i − s_f)(1 − (t − t0)/(n·Δt))³ at
  t = t0, t0 + Δt, …, t0 + n·Δt (``start_epoch`` gives t0, ``frequency`` Δt, ``updates`` n).
- ``linear``: the same update steps with s_t = s_i + (s_f − s_i)(t − t0)/(n·Δt).

Steps count optimizer steps from 0, as :meth:`kdexp.method.base.Method.after_step` sees them.
"""

from __future__ import annotations

from kdexp.errors import ConfigError

SCHEDULES = ("oneshot", "iterative", "agp", "linear")


def agp_sparsity(t: int, s_i: float, s_f: float, t0: int, n: int, dt: int) -> float:
    """Zhu & Gupta's cubic ramp at step ``t`` (clamped to [t0, t0 + n·Δt])."""
    progress = min(max((t - t0) / (n * dt), 0.0), 1.0)
    return s_f + (s_i - s_f) * (1.0 - progress) ** 3


def plan(
    schedule: str,
    sparsity: float,
    *,
    total_steps: int,
    steps_per_epoch: int,
    epochs: int,
    initial_sparsity: float = 0.0,
    start_epoch: int = 0,
    frequency: int = 10,
    updates: int = 10,
    rounds: int = 3,
    epochs_per_round: int = 1,
) -> list[tuple[int, float]]:
    """The ``(step, target)`` updates of ``schedule``; ConfigError when they do not fit the run."""
    if schedule not in SCHEDULES:
        raise ConfigError("method.schedule", schedule, "one of " + ", ".join(SCHEDULES))
    if schedule == "oneshot":
        return [(0, sparsity)]
    if schedule == "iterative":
        for key, value in (("rounds", rounds), ("epochs_per_round", epochs_per_round)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"method.{key}", value, "a positive integer")
        if rounds * epochs_per_round > epochs:
            raise ConfigError(
                "method.rounds",
                rounds,
                f"rounds × epochs_per_round ({epochs_per_round}) within schedule.epochs "
                f"({epochs}): each round is followed by epochs_per_round epochs of fine-tuning",
            )
        return [
            (k * epochs_per_round * steps_per_epoch, 1.0 - (1.0 - sparsity) ** ((k + 1) / rounds))
            for k in range(rounds)
        ]
    for key, value in (("frequency", frequency), ("updates", updates)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"method.{key}", value, "a positive integer")
    if not isinstance(start_epoch, int) or start_epoch < 0:
        raise ConfigError("method.start_epoch", start_epoch, "a non-negative integer")
    if not 0 <= initial_sparsity <= sparsity:
        raise ConfigError(
            "method.initial_sparsity", initial_sparsity, f"a value in [0, sparsity={sparsity}]"
        )
    t0 = start_epoch * steps_per_epoch
    last = t0 + updates * frequency
    if last > total_steps - 1:
        raise ConfigError(
            "method.updates",
            updates,
            f"updates that fit the run: the last one is at step start_epoch·steps_per_epoch + "
            f"updates·frequency = {t0} + {updates}·{frequency} = {last}, but the run has "
            f"{total_steps} steps (schedule.epochs {epochs} × {steps_per_epoch} per epoch, "
            f"the last being {total_steps - 1}); lower method.updates, method.frequency or "
            "method.start_epoch, or raise schedule.epochs",
        )
    steps = [t0 + i * frequency for i in range(updates + 1)]
    if schedule == "agp":
        return [
            (t, agp_sparsity(t, initial_sparsity, sparsity, t0, updates, frequency)) for t in steps
        ]
    return [
        (t, initial_sparsity + (sparsity - initial_sparsity) * i / updates)
        for i, t in enumerate(steps)
    ]
