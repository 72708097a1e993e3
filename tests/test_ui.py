"""The MLflow UI in a real headless browser (Debian's ``chromium``): the link kdexp prints at the
end of a sweep opens the runs page on the sweep's saved view, where its runs can be told apart
and the first chart sections are the curves (issue 14).

Skipped, saying why, when no chromium is installed (``.ci/run`` installs it).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_cli

_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _browser() -> str | None:
    return next((path for name in _BROWSERS if (path := shutil.which(name))), None)


def _render(browser: str, url: str, out: Path) -> str:
    """The page's DOM after its scripts ran, and a screenshot of it at ``out``."""
    common = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1600,1000",
        "--virtual-time-budget=30000",
    ]
    run = {"capture_output": True, "text": True, "timeout": 240}
    subprocess.run([*common, f"--screenshot={out}", url], check=False, **run)  # type: ignore[call-overload]
    done = subprocess.run([*common, "--dump-dom", url], check=False, **run)  # type: ignore[call-overload]
    return done.stdout


@pytest.mark.slow
def test_the_printed_link_opens_the_runs_page_with_runs_told_apart(
    tmp_path: Path, mlflow_server: str
) -> None:
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium on this machine (apt-get install -y chromium)")
    args = ["-m", "method=baseline", "schedule.epochs=1", "dataset.train_limit=10"]
    args += ["latency_repeats=1", "tracking.system_metrics=false", "tracking.log_model=false"]
    args += ["schedule.lr=0.05,0.1", "seed=0,1"]
    args += [f"tracking.uri={mlflow_server}", "tracking.experiment=ui"]
    done = run_cli(args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    found = re.search(r"kdexp: compare the sweep's runs at (\S+)", done.stdout)
    assert found, done.stdout
    link = found.group(1)
    assert link.startswith(f"{mlflow_server}/#/experiments/") and "/runs?" in link
    assert "viewStateShareKey=sweep-" in link and "compareRunsMode=CHART" in link
    assert "View experiment at" not in done.stdout  # MLflow's own link: the GenAI overview
    assert re.search(r"kdexp: tables and plots: kdexp-report --sweep \S+", done.stdout)

    screenshot = tmp_path / "runs.png"
    dom = _render(browser, link, screenshot)
    assert screenshot.is_file()
    assert "Training runs" in dom  # the runs page, not the GenAI overview
    names = [
        f"baseline lr={lr} seed{seed} epochs=1 train_limit=10"
        for lr in ("0.05", "0.1")
        for seed in (0, 1)
    ]
    for name in names:  # each run is listed (flat: a filtered page does not fold them)
        assert dom.count(name) >= 1, name
    assert "sweep baseline lr=0.05,0.1 seed=0,1" in dom
    assert "viewing a shared view" in dom  # the saved view was found and applied

    # The chart sections, in the order the page shows them: the curves first, then the
    # end-of-run bars (MLflow's own order would be alphabetical: best, last, model, test, ...).
    text = re.sub(r"\s*\|[\s|]*", "|", re.sub(r"<[^>]+>", "|", dom))
    shown = re.findall(r"\|([A-Za-z][\w /]*?)\|\((\d+)\)\|", text)
    order = [name for name, count in shown if int(count) > 0]
    assert order[:2] == ["train", "val"], shown
    assert order.index("val") < order.index("best") < order.index("model"), shown
    assert all(int(count) > 0 for _, count in shown), shown  # no empty section is listed
