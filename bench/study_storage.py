"""Which Optuna storage holds up when a search's jobs write to one study at once: SQLite (RDB)
or the journal file (``JournalStorage`` on a locked file)?

Usage: ``python bench/study_storage.py [--trials N] [--workers W]``. For each storage, in a fresh
folder, the parent asks N trials of a study and ``W`` worker processes (as joblib's workers do)
each take trials from a queue, report 10 per-epoch values to the trial's twin in a pruning
study, ask the median pruner after each, and end the twin; the parent tells each search trial.
It prints, per storage, the wall time, the errors raised, and whether every trial is in the
study exactly once with its 10 reports (no trial lost or duplicated).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from kdexp.search import open_storage

EPOCHS = 10


def _worker(spec: str, jobs: mp.Queue, errors: mp.Queue) -> None:
    storage = open_storage(spec)
    study = optuna.load_study(
        study_name="bench:pruning", storage=storage, pruner=optuna.pruners.MedianPruner(2, 1)
    )
    while (number := jobs.get()) is not None:
        try:
            trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
            trial = optuna.trial.Trial(study, trial_id)
            pruned = False
            for epoch in range(EPOCHS):
                trial.report(float(number % 7 + epoch), epoch)
                if trial.should_prune():
                    pruned = True
                    break
            if pruned:
                study.tell(trial, state=TrialState.PRUNED)
            else:
                study.tell(trial, float(number % 7 + epoch))
        except Exception as error:  # counted, not raised: the point is to see them
            errors.put(f"{type(error).__name__}: {error}")


def measure(spec: str, trials: int, workers: int) -> tuple[float, int, bool]:
    """(seconds, errors, every trial present once with its reports) for one storage."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(spec)
    study = optuna.create_study(study_name="bench", storage=storage)
    twins = optuna.create_study(study_name="bench:pruning", storage=storage)
    context = mp.get_context("spawn")
    jobs, errors = context.Queue(), context.Queue()
    start = time.perf_counter()
    procs = [context.Process(target=_worker, args=(spec, jobs, errors)) for _ in range(workers)]
    for proc in procs:
        proc.start()
    asked = []
    for _ in range(trials):
        trial, twin = study.ask(), twins.ask()
        asked.append(trial)
        jobs.put(twin.number)
    for _ in procs:
        jobs.put(None)
    for proc in procs:
        proc.join()
    for trial in asked:
        study.tell(trial, float(trial.number))
    seconds = time.perf_counter() - start
    count = 0
    while not errors.empty():
        print("   ", errors.get())
        count += 1
    done = study.get_trials(states=(TrialState.COMPLETE,))
    finished = twins.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    numbers = sorted(t.number for t in finished)
    reported = all(
        len(t.intermediate_values) == EPOCHS
        if t.state == TrialState.COMPLETE
        else t.intermediate_values
        for t in finished
    )
    whole = len(done) == trials and numbers == list(range(trials)) and reported
    return seconds, count, whole


def main() -> None:
    """Measure both storages and print one line each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        for label, spec in [
            ("sqlite", f"sqlite:///{Path(folder) / 'optuna.db'}"),
            ("journal", str(Path(folder) / "optuna.journal")),
        ]:
            seconds, count, whole = measure(spec, args.trials, args.workers)
            print(
                f"{label:8s} {args.trials} trials, {args.workers} workers: {seconds:6.1f} s, "
                f"{count} errors, every trial once with its reports: {whole}"
            )


if __name__ == "__main__":
    main()
