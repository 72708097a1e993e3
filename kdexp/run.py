"""One run: seed, build, fit, evaluate, log. :func:`run` is everything a Hydra job does."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import time
import uuid
from pathlib import Path
from typing import cast

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

import kdexp
from kdexp.checkpoint import load_weights, read_state_dict
from kdexp.config import flatten, resolve_device, validate
from kdexp.errors import ConfigError
from kdexp.plots import learning_curves
from kdexp.stats import model_stats
from kdexp.train import LoopOptions, evaluate, fit

log = logging.getLogger(__name__)

#: Metrics every run logs at its end; ``objective`` must name one of them.
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
    "model/flops",
    "model/latency_ms",
    "model/latency_ms_batch",
)


def run(cfg: DictConfig) -> float:
    """Train and evaluate the composed config; return the value of ``cfg.objective``."""
    if "hydra" in cfg:  # composed with return_hydra_config (tests); a job never sees it
        cfg = OmegaConf.masked_copy(cfg, [str(k) for k in cfg if k != "hydra"])
    validate(cfg)
    if cfg.objective not in FINAL_METRICS:
        raise ConfigError("objective", cfg.objective, "one of " + ", ".join(FINAL_METRICS))
    seed_everything(cfg.seed, cfg.deterministic)
    device = resolve_device(cfg.device)

    data = instantiate(cfg.dataset)(batch_size=cfg.schedule.batch_size, seed=cfg.seed)
    model: nn.Module = instantiate(cfg.model)
    if cfg.checkpoint is not None:
        load_weights(model, cfg.checkpoint, "checkpoint")
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.schedule.label_smoothing)
    method = instantiate(cfg.method)(data=data, criterion=criterion)
    model = method.prepare(model).to(device)
    method.to(device)
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    # torch.compile of a Module returns an OptimizedModule, itself a Module.
    trained = cast(nn.Module, torch.compile(model)) if cfg.compile else model
    params = [p for p in [*model.parameters(), *method.parameters()] if p.requires_grad]
    optimizer = instantiate(cfg.schedule.optimizer)(params=params)
    scheduler = instantiate(cfg.schedule.scheduler)(
        optimizer,
        epochs=cfg.schedule.epochs,
        steps_per_epoch=len(data.train),  # type: ignore[arg-type]
    )
    out_dir = _output_dir()
    checkpoint_dir = out_dir / "checkpoints"
    options = LoopOptions(
        epochs=cfg.schedule.epochs,
        device=device,
        grad_clip=cfg.schedule.grad_clip,
        amp=cfg.amp,
        channels_last=cfg.channels_last and device.type == "cuda",
        log_every=cfg.log_every,
        checkpoint_dir=checkpoint_dir,
    )
    names = _names(cfg)
    tracker = instantiate(cfg.tracking)
    run_name = "-".join([*names.values(), f"seed{cfg.seed}", uuid.uuid4().hex[:6]]).replace(
        "/", "."
    )
    with tracker.run(run_name, dict(flatten(cfg)), _tags(cfg, names, device)):
        result = fit(trained, method, data, optimizer, scheduler, tracker, options)
        if cfg.test_on == "best":
            model.load_state_dict(read_state_dict(checkpoint_dir / "best.pt", "test_on"))
        model = method.finalize(model)
        test = evaluate(model, data.test, device, criterion)
        final = {
            "best/val_acc1": result.best_val_acc1,
            "best/epoch": result.best_epoch,
            "last/val_acc1": result.history[-1]["val/acc1"],
            "test/loss": test["loss"],
            "test/acc1": test["acc1"],
            "test/acc5": test["acc5"],
            **model_stats(model, data.input_shape, cfg.schedule.batch_size, cfg.latency_repeats),
        }
        tracker.log_metrics(final, result.steps)
        tracker.flush()
        _log_artifacts(tracker, cfg, out_dir, result.history)
    print(
        f"kdexp: test/acc1 {final['test/acc1']:.2f}%  best/val_acc1 {result.best_val_acc1:.2f}% "
        f"(epoch {result.best_epoch + 1})\n"
        f"kdexp: logged to {tracker.describe()}\nkdexp: outputs in {out_dir}",
        flush=True,
    )
    return float(final[cfg.objective])


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


def _names(cfg: DictConfig) -> dict[str, str]:
    """The chosen option of each group (``distill/kd``), or the class name without Hydra."""
    choices = dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}
    return {
        group: choices.get(group) or str(cfg[group].get("_target_", "?")).rsplit(".", 1)[-1]
        for group in ("method", "model", "dataset")
    }


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
        "kdexp_version": kdexp.__version__,
        "torch_version": torch.__version__,
        "git_commit": commit or "unknown",
        "git_dirty": str(bool(_git("status", "--porcelain"))).lower() if commit else "unknown",
    }
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        tags["overrides"] = " ".join(hc.overrides.task) or "(none)"
        if hc.mode == RunMode.MULTIRUN:
            tags["sweep_dir"] = str(Path(hc.sweep.dir).resolve())
            tags["job_num"] = str(hc.job.num)
    return tags


def _log_artifacts(tracker, cfg: DictConfig, out_dir: Path, history: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    resolved = out_dir / "config_resolved.yaml"
    resolved.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tracker.log_artifact(resolved)
    if (out_dir / ".hydra").is_dir():
        tracker.log_artifact(out_dir / ".hydra", "hydra")
    best = out_dir / "checkpoints" / "best.pt"
    if best.is_file():
        tracker.log_artifact(best, "checkpoints")
    tracker.log_artifact(learning_curves(history, out_dir / "learning_curves.png"))
