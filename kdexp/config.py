"""Checks on the composed config, run before any data is loaded or any run is opened, and the
flattening of a config into MLflow params."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from kdexp.errors import ConfigError


def _positive(cfg: DictConfig, key: str, kind: type) -> None:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(key, value, f"a positive {'integer' if kind is int else 'number'}")
    if kind is int and int(value) != value:
        raise ConfigError(key, value, "a positive integer")


def _one_of(cfg: DictConfig, key: str, accepted: tuple) -> None:
    value = OmegaConf.select(cfg, key)
    if value not in accepted:
        raise ConfigError(key, value, "one of " + ", ".join(map(str, accepted)))


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first bad value found in the composed config."""
    _positive(cfg, "schedule.epochs", int)
    _positive(cfg, "schedule.batch_size", int)
    _positive(cfg, "schedule.lr", float)
    _positive(cfg, "log_every", int)
    _positive(cfg, "latency_repeats", int)
    _one_of(cfg, "amp", (None, "bf16", "fp16"))
    _one_of(cfg, "test_on", ("best", "last"))
    resolve_device(cfg.device)
    model_classes = OmegaConf.select(cfg, "model.num_classes")
    if model_classes is not None and model_classes != cfg.dataset.num_classes:
        raise ConfigError(
            "model.num_classes",
            model_classes,
            f"the dataset's class count, {cfg.dataset.num_classes} (dataset.num_classes); "
            "leave it at ${dataset.num_classes}",
        )
    if cfg.checkpoint is not None and not Path(cfg.checkpoint).expanduser().is_file():
        raise ConfigError(
            "checkpoint", cfg.checkpoint, "the path of an existing checkpoint file, or null"
        )


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; a named device must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError("device", name, "auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", name, "auto or cpu: CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device", name, "auto or cpu: MPS is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError("device", name, "auto, cpu, cuda, cuda:N or mps")
    return device


def flatten(
    cfg: DictConfig | ListConfig | object, prefix: str = ""
) -> Iterator[tuple[str, object]]:
    """Yield ``(dotted.key, value)`` for every leaf of a resolved config."""
    if isinstance(cfg, DictConfig):
        for key, value in cfg.items():
            yield from flatten(value, prefix + str(key) + ".")
    elif isinstance(cfg, ListConfig) and any(isinstance(v, (DictConfig, ListConfig)) for v in cfg):
        for i, value in enumerate(cfg):
            yield from flatten(value, f"{prefix}{i}.")
    elif isinstance(cfg, ListConfig):
        yield prefix[:-1], list(cfg)
    else:
        yield prefix[:-1], cfg
