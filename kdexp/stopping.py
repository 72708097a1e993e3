"""What a job of a sweep does when a signal stops it, and the sweep's own stop handler.

A job stopped by SIGINT or SIGTERM is recorded KILLED in the sweep's job table (its MLflow run
is KILLED with a ``kdexp.resume`` tag). Under the basic launcher, whose jobs run in the launching
process, that signal was meant for the sweep: the job also asks the sweep to stop
(:func:`kdexp.sweep.request_stop`), so the jobs after it do not begin. Under a parallel launcher the
launching process has its own handler (:func:`install_sweep_handler`) that asks the same; each job
polls the request and stops after its current step.

SIGUSR2 is the signal submitit sends at a SLURM time limit or preemption: the job has checkpointed
and stopped, counts one requeue, and hands over to submitit's handler, which requeues it. The
requeued job finds its own checkpoint and carries on in the same MLflow run by itself.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from kdexp.sweep import record_requeue, record_stopped, request_stop

if TYPE_CHECKING:  # kdexp.resume imports torch, which a sweep's launching process does not need
    from kdexp.resume import Interrupted

log = logging.getLogger(__name__)


def job_stopped(stop: Interrupted) -> None:
    """Record a stopped multirun job (see the module); returns None, the job's value to Hydra."""
    from kdexp.resume import hand_over

    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    if stop.signum == signal.SIGUSR2:
        count = record_requeue(job_dir)
        log.warning("job %s: checkpointed; requeue number %d", hc.job.num, count)
        if hand_over(signal.SIGUSR2):  # submitit requeues the job and exits
            return None
    if stop.run_id is None and stop.step == 0:
        message = f"not begun: the sweep was stopped ({signal.Signals(stop.signum).name})"
    else:
        message = f"{stop}; resume with: {stop.command}"
    record_stopped(job_dir, overrides, stop.run_id, message)
    if hc.runtime.choices.get("hydra/launcher") == "basic":  # the signal was the sweep's
        request_stop(Path(hc.sweep.dir), stop.signum)
    return None


def install_sweep_handler(sweep_dir: Path) -> None:
    """In the launching process: SIGINT and SIGTERM ask every job of the sweep to stop, and the
    sweep waits for them to record themselves. A second SIGINT interrupts at once."""

    def handler(signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and (sweep_dir / "stop_requested").is_file():
            raise KeyboardInterrupt
        log.warning(
            "%s: stopping every job of the sweep after its current step",
            signal.Signals(signum).name,
        )
        request_stop(sweep_dir, signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def stopped_after_finishing(signum: int) -> None:
    """A signal came after a job's last phase: the job ends FINISHED; a sweep run by the basic
    launcher (in this process, so the signal was the sweep's) begins no more jobs."""
    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN and hc.runtime.choices.get("hydra/launcher") == "basic":
        request_stop(Path(hc.sweep.dir), signum)
