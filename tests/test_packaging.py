"""The wheel ships the config tree, so an installed `kdexp` finds conf/ without a checkout."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

from tests.conftest import ROOT


def test_every_package_is_listed_in_pyproject() -> None:
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for top in ("kdexp", "hydra_plugins")
        for p in (ROOT / top).rglob("__init__.py")
    }
    assert found | {"kdexp.conf"} == listed


@pytest.mark.slow
def test_wheel_ships_configs_and_runs_from_elsewhere(tmp_path: Path) -> None:
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("kdexp-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    yamls = {f"kdexp/conf/{p.relative_to(ROOT / 'conf')}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert yamls <= names
    assert {"kdexp/cli.py", "kdexp/model/mlp.py", "kdexp/tracking/mlflow.py"} <= names

    # Unpacked elsewhere and first on the path, the wheel's copy composes the default job.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    shown = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, kdexp.cli; print(kdexp.cli.__file__); "
            "sys.argv = ['kdexp', '--cfg', 'job']; kdexp.cli.main()",
        ],
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(str(site / "kdexp" / "cli.py"))
    assert "_target_: kdexp.model.mlp.MLP" in shown.stdout
