"""Pipelines: one command runs stages in order, each stage a run that starts from an earlier one.

A pipeline config (``experiment=pipeline_kd_prune_quant``) lists its stages in ``pipeline`` and
gives each under ``stages.<name>`` as a partial config over the rest of the job's config: a node
with a ``_target_`` (a method, a model) replaces the job's, any other node is merged into it.
``checkpoint: stage:<name>`` and ``teacher_checkpoint: stage:<name>`` take an earlier stage's
final model, handed over as that run's ``checkpoints/final.pt`` artifact.

Every stage is an MLflow run of its own, tagged ``mlflow.parentRunId`` with the pipeline's run
(the MLflow UI nests them) and ``kdexp.stage`` with its name. With ``reuse=auto`` (the default) a
stage whose config and inputs match a FINISHED run (:mod:`kdexp.lineage`) is taken from that run
instead of being trained: running a pipeline again trains nothing, and changing only its last
stage trains only that stage. The pipeline's run logs a summary table (accuracy, size, latency and
sparsity per stage), a plot of accuracy against size, and the last stage's final metrics.
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from kdexp import distributed
from kdexp.config import flatten, validate
from kdexp.errors import ConfigError
from kdexp.job import Execute, Job, RunResult
from kdexp.lineage import INPUT_KEYS, PIPELINE_KEYS
from kdexp.method.base import needs_of
from kdexp.plots import accuracy_against_size
from kdexp.tables import markdown_table

log = logging.getLogger(__name__)

_STAGE_REF = re.compile(r"stage:(\w+)")
#: Columns of the pipeline's summary table: (header, metric).
SUMMARY_METRICS = (
    ("test/acc1", "test/acc1"),
    ("params", "model/params"),
    ("nonzero params", "model/nonzero_params"),
    ("size (bytes)", "model/size_bytes"),
    ("compressed (bytes)", "model/compressed_bytes"),  # kdexp.compress format
    ("compression ratio", "model/compression_ratio"),
    ("latency (ms)", "model/latency_ms"),
)


@dataclass
class Stage:
    """One stage of a pipeline: its name, its config (inputs still as ``stage:`` references)
    and the group names that name its run."""

    name: str
    cfg: DictConfig
    names: dict[str, str]


def stages(cfg: DictConfig, names: dict[str, str]) -> list[Stage]:
    """The stages of ``cfg``'s pipeline, each with its full config, checked before any trains.

    ``names`` are the job's group names (method, model, dataset); a stage that brings its own
    method or model is named by its choice in the config groups.
    """
    order = cfg.pipeline
    if not OmegaConf.is_list(order) or not order:
        raise ConfigError("pipeline", order, "a non-empty list of stage names")
    given = cfg.get("stages") or {}
    for name in order:
        if name not in given:
            raise ConfigError("pipeline", name, f"a stage configured under stages: {list(given)}")
    for name in given:
        if name not in order:
            raise ConfigError(f"stages.{name}", "set", f"a stage listed in pipeline: {list(order)}")
    base = OmegaConf.masked_copy(cfg, [str(k) for k in cfg if k not in PIPELINE_KEYS])
    built: list[Stage] = []
    for name in order:
        stage_cfg = _merge(base, given[name], f"stages.{name}")
        for key in INPUT_KEYS:
            ref = _STAGE_REF.fullmatch(str(stage_cfg.get(key)))
            if ref and ref.group(1) not in [s.name for s in built]:
                raise ConfigError(
                    f"stages.{name}.{key}",
                    stage_cfg[key],
                    f"stage:<an earlier stage>, one of {[s.name for s in built]}",
                )
        _check(stage_cfg, name)
        built.append(Stage(name, stage_cfg, _stage_names(stage_cfg, base, name, names)))
    return built


def _copy(cfg: DictConfig) -> DictConfig:
    """A detached copy of ``cfg`` with its interpolations kept, to resolve in its new root."""
    return cast(DictConfig, OmegaConf.create(OmegaConf.to_container(cfg, resolve=False)))


def _merge(base: DictConfig, stage: DictConfig, where: str) -> DictConfig:
    """``base`` with ``stage`` on top: nodes with a ``_target_`` replace, others merge."""
    merged = _copy(base)
    with open_dict(merged):
        for key, value in stage.items():
            key = str(key)
            if key not in merged and key != "teacher":
                raise ConfigError(
                    f"{where}.{key}", "set", "a key of the run config: " + ", ".join(map(str, base))
                )
            node = (
                OmegaConf.to_container(value, resolve=False)
                if OmegaConf.is_config(value)
                else value
            )
            if isinstance(node, dict) and "_target_" not in node and key in merged:
                merged[key] = OmegaConf.merge(merged[key], node)  # type: ignore[index]
            else:
                merged[key] = node
    if not needs_of(
        merged.method
    ).teacher:  # the teacher a distillation stage brought is not this stage's
        merged = OmegaConf.masked_copy(merged, [str(k) for k in merged if k != "teacher"])
    return merged


def _check(cfg: DictConfig, name: str) -> None:
    """The config checks of a run, with ``stage:`` references standing in for real inputs."""
    probe = _copy(cfg)
    with open_dict(probe):
        for key in INPUT_KEYS:
            if _STAGE_REF.fullmatch(str(probe.get(key))):
                probe[key] = "auto"
    try:
        validate(probe)
    except ConfigError as error:
        raise ConfigError(f"stages.{name}: {error.key}", error.value, error.accepted) from None


def _stage_names(
    cfg: DictConfig, base: DictConfig, stage: str, job_names: dict[str, str]
) -> dict[str, str]:
    """Method, model and dataset names of a stage: its own choices where it made them."""
    choices = dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}
    names = dict(job_names)
    for group in ("method", "model", "dataset"):
        target = OmegaConf.select(cfg, f"{group}._target_")
        choice = choices.get(f"{group}@stages.{stage}.{group}")
        if choice:
            names[group] = choice
        elif target != OmegaConf.select(base, f"{group}._target_"):
            names[group] = str(target).rsplit(".", 1)[-1]
    if "teacher" in cfg:
        names["teacher"] = choices.get("model@teacher") or job_names.get("teacher", "teacher")
    else:
        names.pop("teacher", None)
    return names


def run_pipeline(cfg: DictConfig, job: Job, execute: Execute) -> RunResult:
    """Run (or reuse) every stage of ``cfg``'s pipeline under one parent run; see the module."""
    if distributed.current() is not None:
        raise ConfigError(
            "pipeline", list(cfg.pipeline), "a single process: run pipelines without torchrun"
        )
    planned = stages(cfg, job.names)
    reuse = cfg.get("reuse", "auto") == "auto"
    tracker = instantiate(cfg.tracking)
    run_name = "-".join(["pipeline", *[s.name for s in planned], f"seed{cfg.seed}"])
    tags = {
        **job.tags,
        "method": "pipeline",
        "model": job.names["model"],
        "dataset": job.names["dataset"],
        "seed": str(cfg.seed),
        "kdexp.pipeline": " > ".join(s.name for s in planned),
    }
    results: dict[str, RunResult] = {}
    # The stages' settings are params of their own runs: resolved here, an interpolation such as
    # ${schedule.epochs} would show the job's value, not the stage's.
    params = dict(flatten(OmegaConf.masked_copy(cfg, [str(k) for k in cfg if k != "stages"])))
    with tracker.run(run_name, params, tags):
        for stage in planned:
            stage_cfg = _with_inputs(stage.cfg, results)
            if stage is not planned[-1] and OmegaConf.select(stage_cfg, "tracking.register_model"):
                stage_cfg.tracking.register_model = None  # only the last stage registers
            # A sweep's job is the pipeline's run; its stages nest under that run instead.
            outer = {k: v for k, v in job.tags.items() if k not in ("sweep_id", "job_num")}
            stage_tags = {**outer, "kdexp.stage": stage.name}
            if tracker.run_id:
                stage_tags["mlflow.parentRunId"] = tracker.run_id
            log.info("pipeline: stage %s", stage.name)
            results[stage.name] = execute(
                stage_cfg, Job(stage.names, job.out_dir / stage.name, stage_tags), reuse
            )
        last = results[planned[-1].name]
        summary = write_summary(planned, results, job.out_dir)
        composed = job.out_dir / "pipeline_config.yaml"  # the stages as written, unresolved
        composed.write_text(OmegaConf.to_yaml(cfg))
        for path in [*summary, composed]:
            tracker.log_artifact(path, "pipeline")
        per_stage = {
            f"{name}/{metric.removeprefix('model/').replace('/', '_')}": result.metrics[metric]
            for name, result in results.items()
            for _, metric in SUMMARY_METRICS
            if metric in result.metrics
        }
        tracker.log_metrics({**last.metrics, **per_stage}, 0)
        tracker.flush()
        parent = tracker.run_id
    trained = [name for name, result in results.items() if not result.reused]
    if not trained:
        done = "trained nothing, reused every stage"
    else:
        done = f"trained {', '.join(trained)}"
        done += "; reused the rest" if len(trained) < len(results) else ""
    print(
        f"kdexp: pipeline {' > '.join(results)}: {done}\n"
        + summary[1].read_text()
        + f"kdexp: logged to {tracker.describe()}",
        flush=True,
    )
    return RunResult(last.metrics, last.final_checkpoint, parent, last.lineage, last.reused)


def _with_inputs(cfg: DictConfig, results: dict[str, RunResult]) -> DictConfig:
    """``cfg`` with each ``stage:<name>`` input replaced by that stage's model: its run (whose
    lineage the stage inherits) or, without tracking, its final checkpoint file."""
    done = _copy(cfg)
    for key in INPUT_KEYS:
        ref = _STAGE_REF.fullmatch(str(done.get(key)))
        if ref:
            earlier = results[ref.group(1)]
            done[key] = earlier.run_id or str(earlier.final_checkpoint)
    return done


def write_summary(planned: list[Stage], results: dict[str, RunResult], folder: Path) -> list[Path]:
    """The per-stage table (CSV and Markdown) and the accuracy-against-size plot."""
    header = ["stage", "method", "run", "reused", *[h for h, _ in SUMMARY_METRICS], "sparsity"]
    rows: list[list[object]] = []
    for stage in planned:
        result = results[stage.name]
        values = [result.metrics.get(metric, float("nan")) for _, metric in SUMMARY_METRICS]
        params, nonzero = (
            result.metrics.get("model/params"),
            result.metrics.get("model/nonzero_params"),
        )
        sparsity = 1 - nonzero / params if params and nonzero is not None else float("nan")
        rows.append(
            [
                stage.name,
                stage.names["method"],
                result.run_id or "-",
                "yes" if result.reused else "no",
                *values,
                sparsity,
            ]
        )
    folder.mkdir(parents=True, exist_ok=True)
    table = folder / "pipeline_summary.csv"
    with open(table, "w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    markdown = folder / "pipeline_summary.md"
    markdown.write_text(markdown_table(header, [[_format(v) for v in row] for row in rows]))
    plot = accuracy_against_size(
        [stage.name for stage in planned],
        [results[s.name].metrics.get("model/size_bytes", float("nan")) for s in planned],
        [results[s.name].metrics.get("test/acc1", float("nan")) for s in planned],
        folder / "pipeline_accuracy_size.png",
        [results[s.name].metrics.get("model/compressed_bytes", float("nan")) for s in planned],
    )
    return [table, markdown, plot]


def _format(value: object) -> str:
    """Counts as integers (a reused run's come back from MLflow as floats), others to 4 digits."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return f"{value:.4g}" if isinstance(value, float) else str(value)
