"""Architecture search with and without pruning: epochs trained and the front's hypervolume.

Usage: ``python bench/nas.py [--trials N] [--pruner successive_halving|median|hyperband]
[extra overrides...]``. Runs ``experiment=nas_student`` (NSGA-II over the MLP student's width and
depth on digits, objectives best/val_acc1 and model/params, 10 epochs a trial) twice with the
same sampler seed, each in a fresh folder with its own MLflow store and Optuna journal: once
without a pruner, once with one (judging val/acc1 each epoch). It prints, for each, the epochs the
students trained (the teacher, trained once per search, is left out; a shape drawn again reuses
its run and trains nothing), the trials by state, and the hypervolume of Optuna's Pareto front
(study.best_trials) on one reference point: accuracy 0 % and the parameters of the largest
student in the space. Goals: pruned/full epochs at most 0.5, hypervolume within 2 %.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient

from kdexp.search import open_storage

WIDTHS, DEPTHS = (16, 32, 64, 128, 256, 512), (1, 2, 3)  # conf/experiment/nas_student.yaml


def _mlp_params(width: int, depth: int) -> int:
    sizes = [64, *[width] * depth, 10]
    return sum(a * b + b for a, b in zip(sizes, sizes[1:], strict=False))


def hypervolume(points: list[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area dominated by (accuracy, params) points (accuracy maximised, params minimised) and
    bounded by ``reference`` (an accuracy below, a parameter count above every point)."""
    ref_acc, ref_params = reference
    kept = sorted((p, a) for a, p in points if a > ref_acc and p < ref_params)
    area, best = 0.0, ref_acc
    for i, (params, acc) in enumerate(kept):
        best = max(best, acc)
        right = kept[i + 1][0] if i + 1 < len(kept) else ref_params
        area += (right - params) * (best - ref_acc)
    return area


def search(folder: Path, trials: int, pruner: str | None, extra: list[str]) -> dict:
    """Run one search in ``folder``; return its epochs, trial states and front."""
    args = [sys.executable, "-m", "kdexp", "experiment=nas_student"]
    args += [f"hydra.sweeper.n_trials={trials}", "tracking.log_model=false"]
    args += [f"tracking.uri=sqlite:///{folder / 'mlflow.db'}", "tracking.experiment=bench"]
    if pruner:
        args.append(f"hydra/sweeper/pruner={pruner}")
    start = time.perf_counter()
    done = subprocess.run([*args, *extra], cwd=folder, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"search failed:\n{done.stderr[-3000:]}")
    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("bench").experiment_id])
    students = [r for r in runs if "optuna.trial" in r.data.tags]
    epochs = sum(len(client.get_metric_history(r.info.run_id, "val/acc1")) for r in students)
    storage = open_storage(str(folder / "outputs" / "optuna.journal"))
    study = optuna.load_study(study_name="nas_student", storage=storage)
    states: dict[str, int] = {}
    for trial in study.trials:
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
    front = sorted((t.values[0], t.values[1]) for t in study.best_trials)
    return {"epochs": epochs, "states": states, "front": front, "seconds": seconds}


def main() -> None:
    """Run both searches and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--pruner", default="successive_halving")
    args, extra = parser.parse_known_args()
    reference = (0.0, float(_mlp_params(max(WIDTHS), max(DEPTHS))))
    results = {}
    for label, pruner in [("full", None), (f"pruned ({args.pruner})", args.pruner)]:
        with tempfile.TemporaryDirectory() as folder:
            results[label] = search(Path(folder), args.trials, pruner, extra)
        found = results[label]
        found["hv"] = hypervolume(found["front"], reference)
        print(
            f"{label:28s} epochs {found['epochs']:4d}  trials {found['states']}  "
            f"front {len(found['front'])} points, hypervolume {found['hv']:.6g}  "
            f"({found['seconds']:.0f} s)",
            flush=True,
        )
        for acc, params in found["front"]:
            print(f"    best/val_acc1 {acc:6.2f}  params {params:9.0f}")
    full, pruned = results["full"], results[f"pruned ({args.pruner})"]
    print(
        f"epochs pruned/full: {pruned['epochs']}/{full['epochs']} = "
        f"{pruned['epochs'] / full['epochs']:.3f} (goal <= 0.5)\n"
        f"hypervolume pruned/full: {pruned['hv']:.6g}/{full['hv']:.6g} = "
        f"{pruned['hv'] / full['hv']:.4f} (goal >= 0.98); reference point "
        f"(best/val_acc1 {reference[0]}, params {reference[1]:.0f})"
    )


if __name__ == "__main__":
    main()
