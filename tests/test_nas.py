"""Architecture search (experiment=nas_student): multi-objective returns, the search space, and a
4-trial Optuna search on digits read back from MLflow, the sweeper's results and kdexp-report."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from kdexp.errors import ConfigError
from kdexp.report import main as report
from kdexp.run import run
from tests.conftest import run_cli, tracking_overrides

OBJECTIVE = ("best/val_acc1", "model/params")


def _linear_params(sizes: list[int]) -> int:
    return sum(a * b + b for a, b in zip(sizes, sizes[1:], strict=False))


def _choices(cfg, key: str) -> list:
    """The values a ``choice(...)`` in ``hydra.sweeper.params`` offers for ``key``."""
    override = OverridesParser.create().parse_override(f"{key}={cfg.hydra.sweeper.params[key]}")
    return list(override.sweep_iterator())


def _dominated(point: tuple[float, float], others: list[tuple[float, float]]) -> bool:
    """(accuracy, params): another point is at least as accurate and as small, and not equal."""
    acc, size = point
    return any(a >= acc and s <= size and (a, s) != point for a, s in others)


def test_list_objective_returns_each_value_in_order(compose_cfg) -> None:
    cfg = compose_cfg(
        "method=baseline",
        "tracking=none",
        "model.hidden=[32]",
        "schedule.epochs=2",
        "latency_repeats=1",
        "objective=[model/params,test/acc1]",
    )
    params, accuracy = run(cfg)
    assert params == _linear_params([64, 32, 10])
    assert accuracy >= 80.0


@pytest.mark.parametrize(
    "objective",
    ["[]", "[test/acc1,test/acc1]", "[best/val_acc1,val/loss]", "accuracy"],
)
def test_bad_objective_is_refused_before_training(compose_cfg, objective: str) -> None:
    cfg = compose_cfg("method=baseline", "tracking=none", f"objective={objective}")
    with pytest.raises(ConfigError) as error:
        run(cfg)
    assert error.value.key == "objective"
    assert "best/val_acc1" in error.value.accepted


def test_nas_student_searches_mlp_width_and_depth_with_two_objectives(compose_cfg) -> None:
    cfg = compose_cfg("experiment=nas_student")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.sampler._target_ == "optuna.samplers.NSGAIISampler"
    assert sweeper.sampler.seed is not None
    assert list(sweeper.direction) == ["maximize", "minimize"]
    assert tuple(cfg.objective) == OBJECTIVE
    assert cfg.method._target_ == "kdexp.method.distill.kd.KD"
    assert cfg.teacher_checkpoint is None  # auto: one teacher, trained once, reused
    widths, depths = _choices(cfg, "model.width"), _choices(cfg, "model.depth")
    assert len(widths) > 1 and len(depths) > 1
    for width, depth in itertools.product(widths, depths):
        node = OmegaConf.merge(cfg.model, {"width": width, "depth": depth})
        model = instantiate(node)
        count = sum(p.numel() for p in model.parameters())
        assert count == _linear_params([64, *[width] * depth, 10])


def test_nas_student_cifar100_searches_resnet_depth_and_width(compose_cfg) -> None:
    cfg = compose_cfg("experiment=nas_student_cifar100")
    assert list(cfg.hydra.sweeper.direction) == ["maximize", "minimize"]
    assert tuple(cfg.objective) == OBJECTIVE
    depths = _choices(cfg, "model.depth")
    multipliers = _choices(cfg, "model.width_multiplier")
    assert len(depths) > 1 and len(multipliers) > 1
    counts = []
    for depth, multiplier in [(min(depths), min(multipliers)), (max(depths), max(multipliers))]:
        node = OmegaConf.merge(cfg.model, {"depth": depth, "width_multiplier": multiplier})
        counts.append(sum(p.numel() for p in instantiate(node).parameters()))
    assert counts[0] < counts[1]


def _sweep(tmp_path: Path, args: list[str]):
    done = run_cli(["experiment=nas_student", *args, *tracking_overrides(tmp_path)], cwd=tmp_path)
    sweeps = list((tmp_path / "outputs" / "multirun").glob("*/*"))
    assert len(sweeps) == 1, done.stderr
    return done, sweeps[0]


def _runs_and_parent(tmp_path: Path) -> tuple[list[Run], Run]:
    """The jobs' runs (and any teacher trained for them), and the sweep's parent run."""
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    (parent,) = (r for r in found if r.data.tags.get("kdexp.role") == "sweep")
    return [r for r in found if r is not parent], parent


TINY = [
    "hydra.sweeper.n_trials=4",
    "hydra.sweeper.sampler.population_size=4",
    "schedule.epochs=2",
    "latency_repeats=1",
    "tracking.log_model=false",
]


@pytest.mark.slow
def test_four_trial_search_on_digits(tmp_path: Path) -> None:
    # With this seed the four trials (NSGA-II's first generation, drawn at random) have four
    # distinct shapes; other seeds may draw one twice.
    space = ["model.width=choice(16,32,64,128)", "model.depth=choice(1,2)"]
    space += ["hydra.sweeper.sampler.seed=5", "teacher.hidden=[128]"]
    done, sweep = _sweep(tmp_path, [*TINY, *space])
    assert done.returncode == 0, done.stderr
    runs, parent = _runs_and_parent(tmp_path)

    # One teacher baseline, trained by the first trial; the other three fetched it from MLflow.
    teachers = [r for r in runs if r.data.tags["method"] == "baseline"]
    assert len(teachers) == 1 and teachers[0].info.status == "FINISHED"
    assert teachers[0].data.tags["kdexp.trained_for"] == "teacher_checkpoint"
    teacher_id = teachers[0].info.run_id
    assert (sweep / "0" / "teacher_checkpoint").is_dir()
    for job in ("1", "2", "3"):
        assert (sweep / job / "inputs" / teacher_id).is_dir()

    students = [r for r in runs if r.data.tags["method"] == "distill/kd"]
    assert sorted(r.data.tags["job_num"] for r in students) == ["0", "1", "2", "3"]
    assert {r.info.status for r in students} == {"FINISHED"}
    assert {r.data.tags["sweep_dir"] for r in students} == {str(sweep.resolve())}
    assert {r.data.tags["mlflow.parentRunId"] for r in students} == {parent.info.run_id}
    shapes = {
        r.info.run_id: (int(r.data.params["model.width"]), int(r.data.params["model.depth"]))
        for r in students
    }
    assert len(set(shapes.values())) == 4
    values = {}
    for student in students:
        width, depth = shapes[student.info.run_id]
        assert student.data.metrics["model/params"] == _linear_params([64, *[width] * depth, 10])
        values[student.info.run_id] = tuple(student.data.metrics[m] for m in OBJECTIVE)
    assert max(acc for acc, _ in values.values()) >= 80.0

    # The sweep's table of jobs has one column per objective, as the jobs returned them.
    table = {row["run"]: row for row in csv.DictReader((sweep / "sweep_jobs.csv").open())}
    assert set(table) == set(values)
    for run_id, (accuracy, params) in values.items():
        assert float(table[run_id]["best/val_acc1"]) == pytest.approx(accuracy, rel=1e-5)
        assert float(table[run_id]["model/params"]) == params

    # The front computed here from MLflow's metrics is the sweeper's Pareto front.
    front = {i for i, v in values.items() if not _dominated(v, list(values.values()))}
    assert front
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    solutions = {
        (s.params["model.width"], s.params["model.depth"]): tuple(s["values"])
        for s in results.solutions
    }
    assert set(solutions) == {shapes[i] for i in front}
    for run_id in front:
        assert solutions[shapes[run_id]] == pytest.approx(values[run_id])

    # kdexp-report on the sweep's runs marks the same front on accuracy against parameters.
    out = tmp_path / "report"
    args = ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--experiment", "test"]
    args += ["--sweep-dir", str(sweep), "--accuracy", "best/val_acc1", "--out", str(out)]
    assert report(args) == 0
    marked = [row for row in csv.DictReader((out / "pareto.csv").open()) if row["cost"] == "params"]
    assert {row["run ids"] for row in marked} == front
    assert (out / "accuracy_vs_cost.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.parametrize("objectives", ["two", "one"])
def test_failed_trials_are_optuna_failures_and_the_search_goes_on(
    tmp_path: Path, objectives: str
) -> None:
    # width=0 is refused when the model is built: that trial fails, the others run. With one
    # objective a NaN return used to stop the whole search with a traceback.
    args = [*TINY, "method=baseline", "model.width=choice(0,16)", "model.depth=1"]
    if objectives == "one":
        args += ["objective=best/val_acc1", "hydra.sweeper.direction=maximize"]
    done, sweep = _sweep(tmp_path, args)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "model.width=0: a positive number" in done.stderr
    jobs = {p.name: p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()}
    assert len(jobs) == 4
    failed = {n for n, p in jobs.items() if (p / "failed.txt").is_file()}
    assert failed and failed != set(jobs)  # the seeded sampler draws both widths
    assert f"kdexp: {len(failed)} job(s) of the sweep failed:" in done.stderr
    runs, parent = _runs_and_parent(tmp_path)
    assert parent.info.status == "FAILED"  # a job failed
    # Every good trial has the same shape: the first trains it, the later ones reuse its run
    # (skip_finished) and still report its metrics to the sweeper.
    (trained,) = runs
    assert trained.data.params["model.width"] == "16"
    table = list(csv.DictReader((sweep / "sweep_jobs.csv").open()))
    assert {row["job"] for row in table if row["status"] == "FAILED"} == failed
    good = [row for row in table if row["status"] != "FAILED"]
    assert [row["status"] for row in good] == ["FINISHED"] + ["REUSED"] * (len(good) - 1)
    assert {row["run"] for row in good} == {trained.info.run_id}
    accuracy = trained.data.metrics["best/val_acc1"]
    assert all(float(row["best/val_acc1"]) == pytest.approx(accuracy, rel=1e-5) for row in good)
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    if objectives == "one":
        assert results.best_params == {"model.width": 16}
        assert results.best_value == pytest.approx(accuracy)
    else:
        assert results.solutions and {s.params["model.width"] for s in results.solutions} == {16}
        expected = [accuracy, trained.data.metrics["model/params"]]
        assert all(list(s["values"]) == pytest.approx(expected) for s in results.solutions)
