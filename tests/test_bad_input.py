"""Issue 16: bad input everywhere. For every key of the composed configs (generated from the
tree, so a new key is covered with no new test): a value of the wrong type, a value out of range
and, for path keys, a missing file, an empty file and a file of another kind. Each must give a
ConfigError naming the key before anything trains, opens a run or writes a folder; a few go
through the CLI for exit status 2 and no output folder."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write

import kdexp.run
from kdexp.errors import ConfigError
from kdexp.schema import OUTPUT_PATHS, _matches, choices_of, expected_types, is_path_key, range_of
from tests.conftest import CONF, run_cli, tracking_overrides

#: Compositions whose every key is tried: the default job, and a few other groups' options.
COMPOSITIONS = {
    "default": [],
    "baseline_synthetic_resnet8": ["method=baseline", "dataset=synthetic", "model=resnet8"],
    "mnist_lenet5_multistep": [
        "method=baseline",
        "dataset=mnist",
        "dataset.root=.",  # an existing folder; nothing is loaded
        "model=lenet5",
        "schedule=cifar",
    ],
}
#: Candidate wrong values; the first one the key's type refuses is used.
WRONG: list[Any] = ["not_a_value", [1, 2], {"a": 1}, 1.5, True]
_COMPOSED: dict[str, DictConfig] = {}


def _composed(name: str) -> DictConfig:
    """The composition ``name`` with Hydra's node, composed once per session."""
    if name not in _COMPOSED:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            _COMPOSED[name] = compose(
                "train", overrides=COMPOSITIONS[name], return_hydra_config=True
            )
        GlobalHydra.instance().clear()
    return _COMPOSED[name]


def _tree(name: str) -> list[tuple[str, Any, Any]]:
    cfg = _composed(name)
    return list(expected_types(OmegaConf.masked_copy(cfg, [str(k) for k in cfg if k != "hydra"])))


def _number(annotation: Any, value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    return _matches(1.5, annotation) and not _matches("x", annotation) and annotation is not None


def _cases() -> list[Any]:
    cases = []
    for name in COMPOSITIONS:
        for key, value, annotation in _tree(name):
            if annotation is not None:
                wrong = next((w for w in WRONG if not _matches(w, annotation)), None)
                if wrong is not None:
                    cases.append(pytest.param(name, key, wrong, id=f"{name}:{key}:type"))
            bounds = range_of(key)
            if bounds is not None and bounds.outside() is not None and _number(annotation, value):
                outside: Any = bounds.outside()
                outside = int(outside) if float(outside).is_integer() else outside
                if isinstance(value, ListConfig) or "Sequence" in str(annotation):
                    outside = [outside]
                cases.append(pytest.param(name, key, outside, id=f"{name}:{key}:range"))
            elif choices_of(key, annotation):
                cases.append(pytest.param(name, key, "no_such_choice", id=f"{name}:{key}:choice"))
            if is_path_key(key):
                # A folder the run writes into may be missing; an input may not.
                kinds = ["empty", "other_kind"] if key in OUTPUT_PATHS else ["missing", "empty"]
                kinds += [] if key in OUTPUT_PATHS else ["other_kind"]
                for kind in kinds:
                    cases.append(
                        pytest.param(name, key, _PathCase(kind), id=f"{name}:{key}:{kind}")
                    )
    return cases


class _PathCase(str):
    """A file to make in the test's folder: missing, empty or of another kind."""

    def make(self, folder: Path) -> str:
        path = folder / f"{self}.pt"
        if self == "empty":
            path.write_bytes(b"")
        elif self == "other_kind":
            path.write_text("a text file, not a checkpoint\n")
        return str(path)


CASES = _cases()


@pytest.mark.parametrize(("name", "key", "bad"), CASES)
def test_every_key_refuses_bad_input_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, key: str, bad: Any
) -> None:
    def reached(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{key}={bad} reached training")

    monkeypatch.setattr(kdexp.run, "fit", reached)
    monkeypatch.setattr(kdexp.run, "evaluate_only", reached)
    if isinstance(bad, _PathCase):
        bad = bad.make(tmp_path)
    cfg = copy.deepcopy(_composed(name))
    with read_write(cfg), open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        cfg.tracking.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        OmegaConf.update(cfg, key, bad, merge=False)
    HydraConfig.instance().set_config(cfg)
    with pytest.raises(ConfigError) as error:
        kdexp.run.run(cfg)
    assert error.value.key == key, str(error.value)
    assert not (tmp_path / "run").exists()  # no output folder
    assert not (tmp_path / "mlflow.db").exists()  # no run opened, RUNNING or otherwise


def test_every_key_has_a_type_and_every_number_a_range() -> None:
    untyped, unbounded = [], []
    for name in COMPOSITIONS:
        for key, value, annotation in _tree(name):
            if annotation is None:
                untyped.append(key)
            elif _number(annotation, value) and range_of(key) is None:
                unbounded.append(key)
    assert not untyped, f"give these keys a type (kdexp.schema.TYPES or an annotation): {untyped}"
    assert not unbounded, f"declare these keys' ranges in kdexp.schema.RANGES: {unbounded}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "override",
    ["schedule.lr=not_a_value", "model.dropout=2", "checkpoint={empty}", "dataset.val_size=[1,2]"],
)
def test_bad_input_through_the_cli_exits_2_with_no_folder_and_no_run(
    tmp_path: Path, override: str
) -> None:
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    override = override.format(empty=empty)
    store = tracking_overrides(tmp_path, created=False)  # the test: no store is made
    done = run_cli(["method=baseline", override, *store], cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    key = override.split("=")[0]
    assert f"kdexp: error: {key}=" in done.stderr and "Traceback" not in done.stderr
    assert not list(tmp_path.glob("outputs/runs/*/*"))  # no output folder
    assert not (tmp_path / "mlflow.db").exists()


def test_valid_presets_pass_the_generated_checks() -> None:
    """The checks refuse nothing that a shipped experiment preset composes to."""
    from kdexp.schema import check_tree

    for preset in sorted((CONF / "experiment").glob("*.yaml")):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("train", overrides=[f"experiment={preset.stem}"])
        GlobalHydra.instance().clear()
        if "pipeline" in cfg:
            continue
        check_tree(OmegaConf.masked_copy(cfg, [str(k) for k in cfg if k != "hydra"]))
