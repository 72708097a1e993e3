"""The fixed cost of a run against the floor that no run can avoid, as whole processes.

Usage: ``python bench/fixed_cost.py [--repeats N] [--before GIT_REV] [--no-default-job]``.

* The floor: ``python -c "import torch, torch._dynamo, mlflow, hydra"`` plus one
  ``torch.optim.SGD`` (the optimizer's constructor imports ``torch._dynamo``).
* The run: ``python -m kdexp method=baseline schedule.epochs=1``, the digits MLP with tracking
  (SQLite), checkpoints and the logged model all on, in a folder whose store already exists.
* The default job (``make run``): ``python -m kdexp``, its teacher trained by a warm-up run.
* ``--before REV``: the same run from the kdexp of git revision ``REV`` (a temporary worktree),
  for a before/after ratio measured in the same minutes.

Each kind runs once to warm up, then ``--repeats`` times, alternating. For each the script
prints the median wall time, the median CPU time (user + system, from ``wait4``) and the peak
resident memory, their ratios to the floor (targets: wall <= 1.25x and memory <= 1.15x for the
run, wall <= 1.5x for the default job), and the run's breakdown by phase from
``KDEXP_TIMINGS=1`` (imports, store, build, train, final evaluation, statistics, model logging,
artifacts, close, and the exit: from the last handler to the process's end).
On a loaded machine wall times stretch; CPU times and the ratios of alternating runs hold better.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOOR = (
    "import torch, torch._dynamo, mlflow, hydra; "
    "torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)"
)
RUN = ["method=baseline", "schedule.epochs=1"]


@dataclass
class Sample:
    """One process: wall and CPU seconds, peak RSS in MB, and kdexp's phase times if any."""

    wall: float
    cpu: float
    rss_mb: float
    phases: dict[str, float] = field(default_factory=dict)


def measure(command: list[str], cwd: Path, env: dict[str, str]) -> Sample:
    """Run ``command`` to its end; its wall and CPU time, peak memory and phase times."""
    with tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True
        )
        _, status, usage = os.wait4(process.pid, 0)
        end_wall, end_clock = time.perf_counter(), time.time()
        process.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        text = err.read()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{text[-3000:]}")
    phases: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("kdexp-timings: "):
            phases = json.loads(line.removeprefix("kdexp-timings: "))
            phases["exit"] = end_clock - phases.pop("exit_at")
    return Sample(end_wall - start, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, phases)


def _before_tree(rev: str, folder: Path) -> Path:
    """A worktree of ``rev`` whose kdexp (with its conf/) imports ahead of the installed one."""
    tree = folder / "before"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=REPO, check=True)
    (tree / "kdexp" / "conf").symlink_to(tree / "conf")  # the install maps conf/ to kdexp.conf
    return tree


def main() -> None:
    """Alternate the kinds, then print medians, ratios to the floor and the breakdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before", default=None, help="a git revision to compare against")
    parser.add_argument("--no-default-job", action="store_true")
    options = parser.parse_args()
    python = sys.executable
    work = Path(tempfile.mkdtemp(prefix="kdexp-fixed-"))
    env = {**os.environ, "KDEXP_TIMINGS": "1", "HYDRA_FULL_ERROR": "1"}
    kinds: dict[str, tuple[list[str], dict[str, str]]] = {
        "floor": ([python, "-c", FLOOR], env),
        "run": ([python, "-m", "kdexp", *RUN], env),
    }
    if not options.no_default_job:
        kinds["default job"] = ([python, "-m", "kdexp"], env)
    before_tree = None
    if options.before:
        before_tree = _before_tree(options.before, work)
        old_env = {**env, "PYTHONPATH": str(before_tree)}
        kinds[f"run @ {options.before}"] = ([python, "-m", "kdexp", *RUN], old_env)
    samples: dict[str, list[Sample]] = {name: [] for name in kinds}
    try:
        for command, kind_env in kinds.values():  # warm-up: store, teacher, page cache
            measure(command, work, kind_env)
        for round_ in range(options.repeats):
            for name, (command, kind_env) in kinds.items():
                sample = measure(command, work, kind_env)
                samples[name].append(sample)
                print(
                    f"round {round_ + 1}: {name:24s} wall {sample.wall:6.2f} s  "
                    f"cpu {sample.cpu:6.2f} s  peak {sample.rss_mb:6.0f} MB",
                    flush=True,
                )
    finally:
        if before_tree is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(before_tree)], cwd=REPO)
        shutil.rmtree(work, ignore_errors=True)
    _print(samples)


def _print(samples: dict[str, list[Sample]]) -> None:
    floor = samples["floor"]
    wall0 = statistics.median(s.wall for s in floor)
    cpu0 = statistics.median(s.cpu for s in floor)
    rss0 = max(s.rss_mb for s in floor)
    print(f"\nmedians of {len(floor)} alternating rounds ({os.cpu_count()} CPUs):")
    for name, got in samples.items():
        wall = statistics.median(s.wall for s in got)
        cpu = statistics.median(s.cpu for s in got)
        rss = max(s.rss_mb for s in got)
        pairs = ", ".join(f"{s.wall / f.wall:.2f}" for s, f in zip(got, floor, strict=True))
        print(
            f"  {name:24s} wall {wall:6.2f} s ({wall / wall0:.2f}x; per round {pairs})  "
            f"cpu {cpu:6.2f} s ({cpu / cpu0:.2f}x)  peak {rss:6.0f} MB ({rss / rss0:.2f}x)"
        )
    print("targets: run wall <= 1.25x, run memory <= 1.15x, default job wall <= 1.5x the floor")
    for name, got in samples.items():
        phased = [s.phases for s in got if s.phases]
        if not phased:
            continue
        keys = list(dict.fromkeys(k for p in phased for k in p))
        median = {k: statistics.median(p.get(k, 0.0) for p in phased) for k in keys}
        wall = statistics.median(s.wall for s in got)
        other = wall - sum(median.values())
        cells = "  ".join(f"{k} {v:.2f}" for k, v in median.items())
        print(f"breakdown, {name} (median s): {cells}  unaccounted {other:.2f}")


if __name__ == "__main__":
    main()
