"""One run: seed, build, fit, evaluate, log. :func:`run` is everything a Hydra job does."""

from __future__ import annotations

import logging
import os
import random
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

import kdexp
from kdexp import distributed
from kdexp.checkpoint import load_weights, read_state_dict, read_training_state, save_checkpoint
from kdexp.config import config_hash, flatten, pretrain_key, resolve_device, validate
from kdexp.dataset.base import Data
from kdexp.errors import ConfigError
from kdexp.export import check_config as check_export
from kdexp.export import log_onnx
from kdexp.job import Job, RunResult
from kdexp.keys import check_keys
from kdexp.lineage import LINEAGE_TAG, lineage_key
from kdexp.method.base import RUNTIME_ARGS, Method, Needs, needs_of
from kdexp.naming import name_run
from kdexp.pipeline import run_pipeline
from kdexp.plots import draw_aside, learning_curves
from kdexp.pretrained import Weights
from kdexp.pretrained import resolve as resolve_trained
from kdexp.resume import Interrupted, raise_if_stopped, stop_signals
from kdexp.search import PRUNED_TAG, Reporter, trial_reporter, trial_tags
from kdexp.stats import compression_metrics, model_stats
from kdexp.stopping import stopped_after_finishing
from kdexp.sweep import (
    parent_run,
    record_job,
    requeue_tags,
    requeued_checkpoint,
    stop_file,
    sweep_id,
)
from kdexp.timings import phase, resume_gc  # KDEXP_TIMINGS=1: phase times
from kdexp.tracking.base import Tracker
from kdexp.tracking.spool import FILE_NAME as SPOOL_FILE
from kdexp.train import FitResult, LoopOptions, evaluate, evaluate_only, fit

log = logging.getLogger(__name__)

#: Metrics every run logs at its end; ``objective`` names one of them, or a list of them.
#: Set once the final model is logged, so that a resumed run does not log it again.
MODEL_LOGGED_TAG = "kdexp.model_logged"

FINAL_METRICS = (
    "best/val_acc1",
    "best/epoch",
    "last/val_acc1",
    "test/loss",
    "test/acc1",
    "test/acc5",
    "model/params",
    "model/nonzero_params",
    "model/size_bytes",
    "model/compressed_bytes",  # the kdexp.compress format; the ratio is against dense fp32
    "model/compression_ratio",
    "model/flops",
    "model/latency_ms",
    "model/latency_ms_batch",
)


@dataclass
class _Built:
    """A run ready to train: everything :func:`execute` builds before the loop starts."""

    tracker: Tracker
    device: torch.device
    data: Data
    criterion: nn.Module
    model: nn.Module  # on its device, prepared by the method
    method: Method
    needs: Needs
    lineage: str


def run(cfg: DictConfig) -> float | list[float]:
    """The Hydra job: execute the composed config and return the value of ``cfg.objective``.

    A list of metric names (a multi-objective sweep) returns the list of their values, in order.
    A config with a ``pipeline`` runs its stages in order (:mod:`kdexp.pipeline`).
    """
    if "hydra" in cfg:  # composed with return_hydra_config (tests); a job never sees it
        cfg = OmegaConf.masked_copy(cfg, [str(k) for k in cfg if k != "hydra"])
    job = Job(group_names(cfg), _output_dir(), _hydra_tags())
    # One stop handler for the whole job: a signal at any moment ends it cleanly (issue 16).
    with stop_signals(stop_file()) as stop, distributed.session(cfg.device):  # torchrun only
        raise_if_stopped()  # the sweep was stopped before this job began
        if OmegaConf.select(cfg, "pipeline") is not None:
            result = run_pipeline(cfg, job, execute)
        else:
            result = execute(cfg, job, reuse_finished=bool(cfg.get("skip_finished", False)))
    if stop.signum is not None:  # came while the job was finishing: it is done, FINISHED
        stopped_after_finishing(stop.signum)
    objective: float | list[float]
    if isinstance(cfg.objective, str):
        objective = float(result.metrics[cfg.objective])
    else:
        objective = [float(result.metrics[name]) for name in cfg.objective]
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        overrides = list(HydraConfig.get().overrides.task)
        record_job(job.out_dir, overrides, result.run_id, objective, result.reused, result.pruned)
    return objective


def execute(cfg: DictConfig, job: Job, reuse_finished: bool = False) -> RunResult:
    """Seed, build, train, evaluate and log one run of ``cfg``.

    With ``reuse_finished`` a FINISHED run with the same lineage (:mod:`kdexp.lineage`) is
    returned instead, and nothing is trained; a lock keeps parallel jobs from training it twice.
    """
    built = _build(cfg, job)
    raise_if_stopped()  # stopped while building: no run was opened, nothing to carry on
    # resume=auto carries on a stopped run of this config where there is one, else it reuses a
    # FINISHED one (a relaunched sweep finishes only what is missing).
    if OmegaConf.select(cfg, "resume") == "auto" and built.needs.trains:
        stopped = distributed.on_main(lambda: _resume_path(cfg, built.tracker))
        reuse_finished = reuse_finished or stopped is None
    else:
        reuse_finished = reuse_finished or OmegaConf.select(cfg, "resume") == "auto"
    if not reuse_finished:
        return _train(cfg, job, built)
    tracker = built.tracker  # under torchrun rank 0 decides, and tells the other ranks
    with tracker.lock(built.lineage):
        found = distributed.on_main(lambda: tracker.find_finished({LINEAGE_TAG: built.lineage}))
        if found is None:
            return _train(cfg, job, built)
    metrics = distributed.on_main(lambda: tracker.run_metrics(found))
    # A reused pruned run prunes this trial too (kdexp.search).
    pruned = distributed.on_main(lambda: tracker.run_tag(found, PRUNED_TAG, "skip_finished"))
    reporter = trial_reporter(job.tags) if pruned is not None and distributed.is_main() else None
    if reporter is not None:
        reporter.prune()
    log.info("reusing FINISHED run %s (lineage %s): nothing to train", found, built.lineage)
    print(
        f"kdexp: reusing run {found}, FINISHED with the same config and inputs "
        f"(lineage {built.lineage}): test/acc1 {metrics.get('test/acc1', float('nan')):.2f}%",
        flush=True,
    )
    return RunResult(metrics, None, found, built.lineage, reused=True, pruned=pruned is not None)


@phase("build")
def _build(cfg: DictConfig, job: Job) -> _Built:
    """Check ``cfg``, load the data, build the model and method, and load the inputs' weights.

    The inputs (a starting model, a teacher) are found, or trained first, here; their lineage and
    the config give the run's lineage key.
    """
    validate(cfg)
    check_export(cfg)
    _check_objective(cfg.objective)
    needs = needs_of(cfg.method)
    uses_teacher = needs.teacher
    # A key the method does not take is a ConfigError, not instantiate's TypeError.
    check_keys(cfg.method, "method", RUNTIME_ARGS)
    if uses_teacher and "teacher" not in cfg:
        raise ConfigError("teacher", None, "a model config: add model@teacher=<model>")
    if "teacher" in cfg and not uses_teacher:
        raise ConfigError(
            "teacher",
            job.names.get("teacher", "set"),
            "only for distillation methods: pick method=distill/<name>, or drop model@teacher",
        )
    ddp = distributed.current()
    if ddp and not needs.distributed:
        raise ConfigError(
            "method",
            job.names["method"],
            "a method that trains alike on every rank under torchrun (this one declares "
            "Needs(distributed=False)); run it as a single process",
        )
    device = distributed.local_device(resolve_device(cfg.device))
    # Under torchrun only rank 0 talks to MLflow; the others record nothing.
    tracker = instantiate(cfg.tracking) if distributed.is_main() else Tracker()
    data = instantiate(cfg.dataset)(batch_size=cfg.schedule.batch_size, seed=cfg.seed)
    data = distributed.shard(data, cfg.schedule.batch_size)  # each rank's slice of a batch
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.schedule.label_smoothing)

    seed_everything(cfg.seed, cfg.deterministic)
    model: nn.Module = instantiate(cfg.model)
    runtime: dict[str, nn.Module] = {}
    if uses_teacher:
        runtime["teacher"] = instantiate(cfg.teacher)
    # The method checks its settings and layer names here, before any input is trained.
    method = instantiate(cfg.method)(data=data, criterion=criterion, **runtime)
    inputs: dict[str, str] = {}
    if cfg.checkpoint is not None or needs.trained_start:
        # checkpoint=auto (or null) trains or reuses a baseline of the method's start config:
        # this run's, or another dataset's for fine-tuning; None: the model brought its weights.
        start = method.start_config(cfg) if cfg.checkpoint in (None, "auto") else cfg
        if start is not None:
            dataset = job.names["dataset"]
            if start.dataset != cfg.dataset:
                dataset += "-source"
            weights = distributed.on_main(
                lambda: _trained_weights(
                    start, job, tracker, "checkpoint", start.model, job.names["model"], dataset
                )
            )
            method.load_start(model, weights.path, "checkpoint")
            inputs["checkpoint"] = weights.lineage
    # prepare checks what only the model can tell (layer names), before a teacher is trained.
    method.to(device)
    model = method.begin(model.to(device))
    if uses_teacher:
        name = job.names.get("teacher") or _target_name(cfg.teacher)
        weights = distributed.on_main(
            lambda: _trained_weights(cfg, job, tracker, "teacher_checkpoint", cfg.teacher, name)
        )
        load_weights(runtime["teacher"], weights.path, "teacher_checkpoint")
        inputs["teacher_checkpoint"] = weights.lineage
    lineage = lineage_key(cfg, inputs)
    return _Built(tracker, device, data, criterion, model, method, needs, lineage)


def _train(cfg: DictConfig, job: Job, built: _Built) -> RunResult:
    """Train the built run in a tracked run of its own, evaluate the final model and log it.

    A method that does not train (``Needs.trains`` false) is validated once and finalized.
    """
    tracker, device, data, method = built.tracker, built.device, built.data, built.method
    model = built.model  # prepared by the method
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    resume_path = (
        distributed.on_main(lambda: _resume_path(cfg, tracker) or requeued_checkpoint(job.out_dir))
        if built.needs.trains
        else None
    )
    state = read_training_state(resume_path, "resume") if resume_path else None
    # A resumed run keeps writing into the folder of the checkpoint it carries on from.
    checkpoint_dir = resume_path.parent if resume_path else job.out_dir / "checkpoints"
    run_name = name_run(cfg, job, tracker)  # also adds the description and group tags to job
    reporter = trial_reporter(job.tags) if distributed.is_main() else None  # a pruned search
    tags = {**_tags(cfg, job.names, device), LINEAGE_TAG: built.lineage, **job.tags}
    if built.needs.is_baseline and cfg.checkpoint is None:  # reusable as a teacher or start
        tags["kdexp.pretrain_key"] = pretrain_key(cfg)
    tags["kdexp.checkpoint"] = str((checkpoint_dir / "last.pt").resolve())
    resume_id = state.get("run_id") or None if state else None
    if state and resume_id:  # the run keeps its params and tags; only these change
        tags = {"kdexp.checkpoint": tags["kdexp.checkpoint"], "kdexp.resumed_in": str(job.out_dir)}
        tags.update(requeue_tags())
        log.info("resuming run %s at step %d from %s", resume_id, state["step"], resume_path)
    spool = job.out_dir / SPOOL_FILE
    with tracker.run(
        run_name.replace("/", "."), dict(flatten(cfg)), tags, resume_id=resume_id, spool=spool
    ):
        tracker.log_dataset(data, job.names["dataset"], cfg.dataset)
        resume_gc()  # the run is built and tracked: its imports are done (kdexp.timings)
        if distributed.is_main():  # where to watch it, before the first epoch
            print(f"kdexp: {run_name}: started; logging to {tracker.describe()}", flush=True)
        try:
            if built.needs.trains:
                result = _fit(cfg, built, model, checkpoint_dir, state, reporter)
            else:
                result = evaluate_only(model, method, data, tracker, device)
            if result.stopped_after is not None:  # pruned: FINISHED, with the epochs it trained
                tracker.set_tags({PRUNED_TAG: str(result.stopped_after)})
            if not distributed.is_main():  # rank 0 alone tests, measures and logs the final model
                final: dict[str, float] = distributed.from_main({})  # rank 0's final metrics
                return RunResult(final, checkpoint_dir / "final.pt", None, built.lineage)
            final = _finish(cfg, job, built, model, result, checkpoint_dir, resume_id)
        except Interrupted as stop:
            stop.command = _resume_command(job, tracker.run_id, stop.checkpoint)
            stop.run_id = stop.run_id or tracker.run_id
            tracker.set_tags({"kdexp.resume": stop.command})
            raise
    print(
        f"kdexp: {run_name}: test/acc1 {final['test/acc1']:.2f}%  "
        f"best/val_acc1 {result.best_val_acc1:.2f}% (epoch {result.best_epoch})\n"
        f"kdexp: logged to {tracker.describe()}\nkdexp: outputs in {job.out_dir}",
        flush=True,
    )
    final_checkpoint = checkpoint_dir / "final.pt"
    pruned = result.stopped_after is not None
    return RunResult(
        distributed.from_main(final), final_checkpoint, tracker.run_id, built.lineage, pruned=pruned
    )


def _finish(
    cfg: DictConfig,
    job: Job,
    built: _Built,
    model: nn.Module,
    result: FitResult,
    checkpoint_dir: Path,
    resume_id: str | None,
) -> dict[str, float]:
    """Test, measure and log the trained model: the run's final phases.

    A signal between two phases stops the run KILLED (:func:`raise_if_stopped`); training is
    complete in ``last.pt`` by then, so a resume only redoes these phases. Metrics already in
    the run are not logged twice (the tracker skips them) and the model is not logged twice.
    """
    tracker, data, method, device = built.tracker, built.data, built.method, built.device
    last = checkpoint_dir / "last.pt" if built.needs.trains else None
    if cfg.test_on == "best" and built.needs.trains:
        model.load_state_dict(read_state_dict(checkpoint_dir / "best.pt", "test_on"))
    model = method.end(model)
    save_checkpoint(checkpoint_dir / "final.pt", model)
    raise_if_stopped(result.steps, last)
    with phase("final evaluation"):
        test = evaluate(model, data.test, device, built.criterion)
    final = {
        "best/val_acc1": result.best_val_acc1,
        "best/epoch": result.best_epoch,
        "last/val_acc1": result.history[-1]["val/acc1"],
        "test/loss": test["loss"],
        "test/acc1": test["acc1"],
        "test/acc5": test["acc5"],
        **model_stats(model, data.input_shape, cfg.schedule.batch_size, cfg.latency_repeats),
        **method.summary(),
    }
    final.update(compression_metrics(model, final))  # reads the method's model/* counts
    raise_if_stopped(result.steps, last)
    tracker.log_summary(final, result.steps)  # at step 0: the UI draws them as bars
    tracker.flush()
    raise_if_stopped(result.steps, last)
    curves = draw_aside(  # in a child process, while this one logs the model
        partial(learning_curves, result.history), job.out_dir / "learning_curves.png"
    )
    if not (resume_id and tracker.run_tag(resume_id, MODEL_LOGGED_TAG, "resume") == "true"):
        tracker.log_model(model, _input_example(data.test))
        tracker.set_tags({MODEL_LOGGED_TAG: "true"})
    raise_if_stopped(result.steps, last)
    if OmegaConf.select(cfg, "export_onnx", default=False):
        log_onnx(tracker, model, _input_example(data.test), job.out_dir, result.steps)
    _log_artifacts(tracker, cfg, job.out_dir, curves)
    for path in method.artifacts(job.out_dir / "method"):
        tracker.log_artifact(path, "method")
    return final


@phase("train")
def _fit(
    cfg: DictConfig,
    built: _Built,
    model: nn.Module,
    checkpoint_dir: Path,
    state: dict[str, Any] | None,
    reporter: Reporter | None = None,
) -> FitResult:
    """Build the optimizer and LR schedule for ``model`` and the method, and run the loop;
    ``reporter`` (a search trial's) may stop it after an epoch."""
    device, data, method = built.device, built.data, built.method
    # torch.compile of a Module returns an OptimizedModule, itself a Module.
    trained = cast(nn.Module, torch.compile(model)) if cfg.compile else model
    trainable = [p for p in [*model.parameters(), *method.parameters()] if p.requires_grad]
    params: list[Any] = method.param_groups(model, cfg.schedule.lr) or trainable
    optimizer = instantiate(cfg.schedule.optimizer)(params=params)
    scheduler = instantiate(cfg.schedule.scheduler)(
        optimizer,
        epochs=cfg.schedule.epochs,
        steps_per_epoch=len(data.train),  # type: ignore[arg-type]
    )
    options = LoopOptions(
        epochs=cfg.schedule.epochs,
        device=device,
        grad_clip=cfg.schedule.grad_clip,
        amp=cfg.amp,
        channels_last=cfg.channels_last and device.type == "cuda",
        log_every=cfg.log_every,
        checkpoint_dir=checkpoint_dir if distributed.is_main() else None,
        checkpoint_every_steps=OmegaConf.select(cfg, "checkpoint_every_steps"),
        on_nonfinite=OmegaConf.select(cfg, "on_nonfinite", default="stop"),
        on_epoch=reporter.on_epoch if reporter is not None else None,
    )
    ddp = distributed.current() is not None
    front = distributed.wrap(trained, method, data.train, device) if ddp else None
    return fit(trained, method, data, optimizer, scheduler, built.tracker, options, state, front)


def _check_objective(objective: object) -> None:
    """``objective`` names one final metric, or is a non-empty list of distinct ones."""
    many = isinstance(objective, ListConfig | list)
    names = list(objective) if isinstance(objective, ListConfig | list) else [objective]
    # Membership first: by the time set() hashes the names, they are all strings.
    if not names or any(n not in FINAL_METRICS for n in names) or len(set(names)) < len(names):
        accepted = "one of " + ", ".join(FINAL_METRICS) + ", or a list of distinct ones"
        raise ConfigError("objective", names if many else objective, accepted)


def _input_example(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> np.ndarray:
    """Two inputs of the first batch, as float32 NumPy: the logged model's input example."""
    inputs, _ = next(iter(batches))
    return inputs[:2].detach().cpu().float().numpy()


def _resume_path(cfg: DictConfig, tracker: Tracker) -> Path | None:
    """The training state file that ``cfg.resume`` names; None to start afresh.

    ``auto`` takes the newest KILLED or FAILED run with this config's hash, if any; a run id
    takes that run's checkpoint (its ``kdexp.checkpoint`` tag); anything else is a file path.
    """
    source = OmegaConf.select(cfg, "resume")
    if source is None:
        return None
    text = str(source)
    if text == "auto":
        run_id = tracker.find_resumable({"kdexp.config_hash": config_hash(cfg)})
        path = tracker.run_tag(run_id, "kdexp.checkpoint", "resume") if run_id else None
        if path is None or not Path(path).is_file():
            log.info("resume=auto: no stopped run of this config to carry on; starting afresh")
            return None
    elif re.fullmatch(r"[0-9a-f]{32}", text) and not Path(text).exists():
        path = tracker.run_tag(text, "kdexp.checkpoint", "resume")
        if path is None:
            raise ConfigError(
                "resume", text, "a run that kdexp checkpointed (no kdexp.checkpoint tag)"
            )
    else:
        path = text
    return Path(path).expanduser().resolve()


def _resume_command(job: Job, run_id: str | None, checkpoint: Path | None) -> str:
    """The command that carries on this run: its overrides, with ``resume=`` set."""
    words = [w for w in job.tags.get("overrides", "").split() if not w.startswith("resume=")]
    words = [w for w in words if w != "(none)"]
    return " ".join(["kdexp", *words, f"resume={run_id or checkpoint}"])


def _trained_weights(
    cfg: DictConfig,
    job: Job,
    tracker: Tracker,
    key: str,
    model_cfg: DictConfig,
    name: str,
    dataset: str | None = None,
) -> Weights:
    source = cfg[key] if cfg[key] is not None else "auto"
    names = {"method": "baseline", "model": name, "dataset": dataset or job.names["dataset"]}
    return resolve_trained(
        str(source),
        key=key,
        model_cfg=model_cfg,
        names=names,
        cfg=cfg,
        tracker=tracker,
        out_dir=job.out_dir,
        execute=execute,
    )


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices); optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def _output_dir() -> Path:
    if HydraConfig.initialized() and HydraConfig.get().runtime.output_dir:
        return Path(HydraConfig.get().runtime.output_dir)
    return Path("outputs", "runs", time.strftime("%Y-%m-%d/%H-%M-%S-") + uuid.uuid4().hex[:6])


def _target_name(node: DictConfig) -> str:
    return str(node.get("_target_", "?")).rsplit(".", 1)[-1]


def group_names(cfg: DictConfig) -> dict[str, str]:
    """The chosen option of each group (``distill/kd``), or the class name without Hydra."""
    choices = dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}
    names = {
        group: choices.get(group) or _target_name(cfg[group])
        for group in ("method", "model", "dataset")
    }
    if "teacher" in cfg:
        names["teacher"] = choices.get("model@teacher") or _target_name(cfg.teacher)
    return names


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip()


def _tags(cfg: DictConfig, names: dict[str, str], device: torch.device) -> dict[str, str]:
    commit = _git("rev-parse", "HEAD")
    tags = {
        **names,
        "seed": str(cfg.seed),
        "device": str(device),
        "torch_threads": str(torch.get_num_threads()),  # parallel launchers may lower it
        "kdexp_version": kdexp.__version__,
        "torch_version": torch.__version__,
        "git_commit": commit or "unknown",
        "git_dirty": str(bool(_git("status", "--porcelain"))).lower() if commit else "unknown",
        "kdexp.config_hash": config_hash(cfg),
    }
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def _hydra_tags() -> dict[str, str]:
    """The command-line overrides and, in a multirun, the sweep (folder, id, parent run) and the
    job's number."""
    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    tags = {"overrides": " ".join(hc.overrides.task) or "(none)"}
    if hc.mode == RunMode.MULTIRUN:
        tags["sweep_dir"] = str(Path(hc.sweep.dir).resolve())
        tags["sweep_id"] = sweep_id(Path(hc.sweep.dir))
        tags["job_num"] = str(hc.job.num)
        parent = parent_run(Path(hc.sweep.dir))
        if parent is not None:
            tags["mlflow.parentRunId"] = parent
        tags.update(trial_tags())  # optuna.study, optuna.trial (kdexp_optuna sweeper)
    return tags


@phase("artifacts")
def _log_artifacts(
    tracker: Tracker, cfg: DictConfig, out_dir: Path, curves: Callable[[], Path]
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    resolved = out_dir / "config_resolved.yaml"
    resolved.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tracker.log_artifact(resolved)
    if (out_dir / ".hydra").is_dir():
        tracker.log_artifact(out_dir / ".hydra", "hydra")
    for name in ("best.pt", "final.pt"):
        if (out_dir / "checkpoints" / name).is_file():
            tracker.log_artifact(out_dir / "checkpoints" / name, "checkpoints")
    tracker.log_artifact(curves())  # the learning curves, drawn aside (_finish)
