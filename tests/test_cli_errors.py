"""Config mistakes answered by kdexp with exit status 2, and sweeps that stop early leave nothing
behind (issue 14)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from kdexp.choices import COMPONENT_GROUPS
from kdexp.errors import ConfigError
from kdexp.preflight import check_command_line, closest_first, group_options
from tests.conftest import run_cli, tracking_overrides


def _error(argv: list[str]) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        check_command_line(argv)
    return caught.value


def test_an_unknown_option_lists_every_option_nested_ones_too_closest_first() -> None:
    error = _error(["method=distill/kdd"])
    assert (error.key, error.value) == ("method", "distill/kdd")
    listed = error.accepted.split(": ", 1)[1].split(", ")
    assert listed[0] == "distill/kd"
    for option in ("baseline", "finetune", "distill/dkd", "prune/magnitude", "quantize/qat"):
        assert option in listed, option
    folder = Path(__file__).resolve().parents[1] / "conf" / "method"
    # Every method yaml on disk, less the shared pieces (``_``-files) and the component groups
    # (a pruning schedule or importance is chosen by a key of the method, not as a method).
    on_disk = {
        str(p.relative_to(folder).with_suffix(""))
        for p in folder.rglob("*.yaml")
        if not p.name.startswith("_")
        and not any(str(p.parent).endswith(g) for g in COMPONENT_GROUPS)
    }
    assert set(listed) == on_disk


def test_a_swept_unknown_option_is_caught_before_any_job() -> None:
    error = _error(["-m", "method=distill/kd,distill/kdd"])
    assert error.value == "distill/kdd"


def test_closest_first_by_hand() -> None:
    assert closest_first("kdd", ["at", "kd", "dkd", "crd"])[:2] == ["kd", "dkd"]


def test_group_options_of_a_nested_group() -> None:
    from hydra import initialize_config_module

    with initialize_config_module("kdexp.conf", version_base="1.3"):
        options = group_options("method")
    assert "distill/kd" in options and "baseline" in options


@pytest.mark.parametrize("typed", ["schedule.epoch=3", "+schedule.epoch=3", "++schedule.epoch=3"])
def test_an_unknown_key_is_refused_with_the_closest_key(typed: str) -> None:
    error = _error([typed])
    assert error.key.lstrip("+") == "schedule.epoch"
    assert "did you mean schedule.epochs?" in error.accepted


def test_free_form_keys_may_be_added() -> None:
    check_command_line(["+hydra.job.env_set.FOO=1"])  # Hydra's own settings
    # an argument that KD passes on to its base class, left out of kd.yaml
    check_command_line(["+method.student_layers=[fc]"])
    assert "did you mean" in _error(["+method.studnet_layers=[fc]"]).accepted
    # a pipeline stage's settings, merged over the run's config
    pipeline = "experiment=pipeline_kd_prune_quant"
    check_command_line([pipeline, "+stages.teacher.schedule.epochs=3"])
    assert _error([pipeline, "+stages.teacher.shedule.epochs=3"]).key == (
        "+stages.teacher.shedule.epochs"
    )


def test_target_arguments_follow_kwargs_up_the_classes() -> None:
    from kdexp.preflight import target_arguments

    found = target_arguments("kdexp.method.distill.kd.KD")
    assert {"alpha", "T", "student_layers", "cache_teacher"} <= found
    assert "kwargs" not in found
    assert target_arguments("no.such.Thing") == set()


def test_good_command_lines_pass() -> None:
    check_command_line(["method.T=8", "schedule.epochs=3", "model@teacher=mlp_800"])
    check_command_line(["-m", "method.T=2,4", "seed=range(0,2)", "experiment=hinton_mnist"])
    check_command_line(["--help"])


def test_a_good_command_line_is_composed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import hydra

    composed: list[list[str]] = []
    compose = hydra.compose

    def counting(name: str, overrides: list[str], **kwargs: object) -> object:
        composed.append(list(overrides))
        return compose(name, overrides=overrides, **kwargs)

    monkeypatch.setattr(hydra, "compose", counting)
    check_command_line(["method=distill/kd", "method.T=8", "schedule.epochs=3"])
    assert composed == [["method=distill/kd", "method.T=8", "schedule.epochs=3"]]
    composed.clear()  # a mistake is still explained key by key, from the groups' config
    assert "did you mean schedule.epochs?" in _error(["schedule.epoch=3"]).accepted
    assert composed[1:] == [[]]
    composed.clear()  # an added key is checked against the config without it first
    check_command_line(["+method.student_layers=[fc]"])
    assert composed == [[], ["+method.student_layers=[fc]"]]


def test_a_hydra_error_is_a_config_error() -> None:
    error = _error(["schedule.epochs=[1,2"])  # the override's syntax
    assert error.key == "override"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["method=distill/kdd"], "distill/kd"),
        (["schedule.epoch=3"], "did you mean schedule.epochs?"),
        (["+schedule.epoch=3"], "did you mean schedule.epochs?"),
        (["-m", "method=distill/kd,distill/kdd"], "distill/kd"),
    ],
)
def test_the_cli_exits_2_and_leaves_nothing(tmp_path: Path, args: list[str], says: str) -> None:
    done = run_cli([*args, *tracking_overrides(tmp_path, created=False)], cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    assert says in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "outputs").exists()  # no run folder, no multirun folder
    assert not (tmp_path / "mlflow.db").exists()  # no run, RUNNING or otherwise


def test_a_sweep_that_stops_before_its_jobs_leaves_no_running_parent(tmp_path: Path) -> None:
    """Hydra runs no callback when a sweep stops before or between its jobs;
    :meth:`SweepRun.abandon` (registered with atexit) deletes a parent with no jobs and the
    sweep's folder."""
    from hydra import compose, initialize_config_module
    from omegaconf import open_dict

    from kdexp.tracking.callback import SweepRun

    sweep_dir = tmp_path / "multirun" / "day" / "time"
    with initialize_config_module("kdexp.conf", version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[*tracking_overrides(tmp_path), "hydra.sweep.dir=" + str(sweep_dir)],
            return_hydra_config=True,
        )
    with open_dict(cfg):
        cfg.hydra.overrides.task = ["method.T=2,4"]
    callback = SweepRun()
    callback.on_multirun_start(cfg)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("test").experiment_id
    (parent,) = client.search_runs([experiment])
    assert parent.info.status == "RUNNING"
    assert parent.info.run_name == "sweep T=2,4"
    callback.abandon()
    assert client.search_runs([experiment]) == []
    assert not (tmp_path / "multirun").exists()
    callback.abandon()  # twice (atexit after an explicit call) does nothing


def test_a_sweep_stopped_after_a_job_closes_its_parent_failed(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_module
    from omegaconf import open_dict

    from kdexp.sweep import record_job
    from kdexp.tracking.callback import SweepRun

    sweep_dir = tmp_path / "multirun" / "day" / "time"
    with initialize_config_module("kdexp.conf", version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[*tracking_overrides(tmp_path), "hydra.sweep.dir=" + str(sweep_dir)],
            return_hydra_config=True,
        )
    with open_dict(cfg):
        cfg.hydra.overrides.task = ["seed=0,1"]
    callback = SweepRun()
    callback.on_multirun_start(cfg)
    record_job(sweep_dir / "0", ["seed=0"], None, 90.0, reused=False)
    callback.abandon()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (parent,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert parent.info.status == "FAILED"
    assert parent.data.metrics["sweep/finished"] == 1
    assert (sweep_dir / "sweep_jobs.md").is_file()
