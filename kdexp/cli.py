"""The ``kdexp`` command (also ``python -m kdexp``): a Hydra app around :func:`kdexp.run.run`."""

from __future__ import annotations

import io
import os
import shutil
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from hydra_plugins.kdexp_optuna_sweeper import register as _register_sweeper
from kdexp.errors import ConfigError

if TYPE_CHECKING:  # kdexp.resume imports torch: `kdexp --help` stays fast
    from kdexp.resume import Interrupted

_register_sweeper()  # hydra/sweeper=kdexp_optuna, also from an editable install


def main() -> None:
    """The ``kdexp`` command: the command line is checked (:mod:`kdexp.preflight`), then Hydra
    composes the config and runs the job(s) (:func:`app`).

    A mistake in the command line (an unknown option or key, an override Hydra refuses) prints
    one line naming it and what is accepted, and exits with status 2 before anything is written.
    """
    from kdexp.preflight import check_command_line

    whole_lines(sys.__stdout__, sys.__stderr__)
    try:
        check_command_line(sys.argv[1:])
    except ConfigError as error:
        print(f"kdexp: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    app()


@hydra.main(version_base="1.3", config_path="pkg://kdexp.conf", config_name="train")
def app(cfg: DictConfig) -> float | list[float] | None:
    """Run one job. Errors print one line, not a traceback, and exit non-zero.

    A config mistake (:class:`ConfigError`) exits with status 2 and removes the files Hydra wrote
    for the job, so nothing half-written is left. Any other error exits with status 1 and keeps
    its traceback in ``<output dir>/traceback.txt``; ``HYDRA_FULL_ERROR=1`` shows it instead.
    In a multirun neither stops the sweep: the job is recorded as failed and the sweep goes on.
    SIGINT and SIGTERM stop training after the current step with a checkpoint, print how to
    resume, and exit with status 130 and 143 (128 + the signal number).
    """
    from kdexp import timings
    from kdexp.resume import Interrupted
    from kdexp.run import run  # imported here so that `kdexp --help` stays fast

    timings.freeze_imports()
    timings.mark_started()
    whole_lines(sys.__stdout__, sys.__stderr__)  # also in a parallel launcher's workers

    try:
        objective = run(cfg)
        if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0's output folder has it all
            _remove_job_files()
        return objective
    except Interrupted as stop:
        print(_stopped_message(stop), file=sys.stderr, flush=True)
        if _in_multirun():  # issue 16: requeued, or recorded KILLED; the sweep goes on or stops
            from kdexp.stopping import job_stopped

            job_stopped(stop)
            return None
        sys.exit(128 + stop.signum)
    except ConfigError as error:
        print(f"kdexp: error: {error}", file=sys.stderr, flush=True)
        if _in_multirun():
            _failed(str(error))
            return None
        _remove_job_files()
        sys.exit(2)
    except Exception as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        where = _output_dir() / "traceback.txt"
        where.parent.mkdir(parents=True, exist_ok=True)
        where.write_text(traceback.format_exc())
        print(
            f"kdexp: error: {type(error).__name__}: {error}\nkdexp: traceback in {where}",
            file=sys.stderr,
            flush=True,
        )
        if _in_multirun():
            _failed(f"{type(error).__name__}: {error}")
            return None
        sys.exit(1)


def entry() -> None:
    """The console script: :func:`main`, then an exit that skips interpreter teardown.

    The exit status is the one :func:`main` (or Hydra) chose; see :func:`kdexp.timings.exit_now`.
    """
    from kdexp.timings import defer_gc, exit_now

    defer_gc()  # until the run is built (kdexp.run) or the sweep has started (SweepRun)
    try:
        main()
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            exit_now(stop.code or 0)
        raise  # a message for the interpreter to print
    exit_now(0)


def whole_lines(*streams: object) -> None:
    """Make each line printed to ``streams`` reach its file in one write.

    Unbuffered, as ``PYTHONUNBUFFERED=1`` or ``python -u`` make them (common in containers and
    SLURM scripts), ``print`` writes a line and its newline separately, and the parallel jobs of
    a sweep that share one stderr can join two messages on one line. Line-buffered instead, each
    line is still written as soon as it ends. The CLI passes the process's own streams
    (``sys.__stdout__``, ``sys.__stderr__``), not whatever replaced them (pytest's capture).
    """
    for stream in streams:
        if isinstance(stream, io.TextIOWrapper) and stream.write_through:
            stream.reconfigure(write_through=False, line_buffering=True)


def _stopped_message(stop: Interrupted) -> str:
    """What a stopped job prints: its checkpoint and how to resume, or that it had not begun
    (a sweep stopped before this job started)."""
    if not stop.command:
        return f"kdexp: {stop}: the job had not begun; nothing to resume"
    where = f"; checkpoint in {stop.checkpoint}" if stop.checkpoint is not None else ""
    return f"kdexp: {stop}{where}\nkdexp: resume with: {stop.command}"


def _in_multirun() -> bool:
    return HydraConfig.get().mode == RunMode.MULTIRUN


def _failed(message: str) -> None:
    """In a multirun a failing job does not stop the sweep: it is recorded, and
    :class:`kdexp.sweep.ReportFailedJobs` lists it at the end.

    The job returns no value (None), which kdexp's Optuna sweeper (``hydra/sweeper=kdexp_optuna``)
    records as a FAIL trial, with one objective or several.
    """
    from kdexp.sweep import record_failure

    record_failure(_output_dir(), list(HydraConfig.get().overrides.task), message)


def _output_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def _remove_job_files() -> None:
    """Delete what Hydra wrote for a job that stopped before it began: .hydra/ and the log."""
    folder = _output_dir()
    shutil.rmtree(folder / ".hydra", ignore_errors=True)
    (folder / f"{HydraConfig.get().job.name}.log").unlink(missing_ok=True)
    try:
        folder.rmdir()  # only when nothing else is in it
    except OSError:
        pass


if __name__ == "__main__":
    entry()
