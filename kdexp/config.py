"""Checks on the composed config, run before any data is loaded or any run is opened, and the
flattening of a config into MLflow params."""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, ListConfig, OmegaConf

from kdexp.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where a device is resolved: kdexp-report needs none
    import torch


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
    _one_of(cfg, "on_nonfinite", ("stop", "skip"))
    _one_of(cfg, "reuse", ("auto", "never"))
    _one_of(cfg, "skip_finished", (False, True))
    if OmegaConf.select(cfg, "checkpoint_every_steps") is not None:
        _positive(cfg, "checkpoint_every_steps", int)
    resolve_device(cfg.device)
    model_classes = OmegaConf.select(cfg, "model.num_classes")
    if model_classes is not None and model_classes != cfg.dataset.num_classes:
        raise ConfigError(
            "model.num_classes",
            model_classes,
            f"the dataset's class count, {cfg.dataset.num_classes} (dataset.num_classes); "
            "leave it at ${dataset.num_classes}",
        )
    teacher_classes = OmegaConf.select(cfg, "teacher.num_classes")
    if teacher_classes is not None and teacher_classes != cfg.dataset.num_classes:
        raise ConfigError(
            "teacher.num_classes",
            teacher_classes,
            f"the student's and the dataset's class count, {cfg.dataset.num_classes}",
        )
    for key in ("checkpoint", "teacher_checkpoint"):
        _check_source(key, OmegaConf.select(cfg, key))
    registered = OmegaConf.select(cfg, "tracking.register_model")
    if registered is not None and not OmegaConf.select(cfg, "tracking.log_model", default=True):
        raise ConfigError(
            "tracking.register_model",
            registered,
            "null while tracking.log_model=false: only a logged model can be registered",
        )
    # Every other key: its type (from the annotations of what it builds), range and files.
    from kdexp.schema import check_paths, check_tree

    check_tree(cfg)
    check_paths(cfg)


def _check_source(key: str, value: object) -> None:
    """A weights source is null, auto, an existing file, a run id or a runs:/ URI."""
    if value is None or value == "auto":
        return
    text = str(value)
    if Path(text).expanduser().is_file() or text.startswith("runs:/"):
        return
    if re.fullmatch(r"[0-9a-f]{32}", text):
        return
    raise ConfigError(
        key,
        value,
        "the path of an existing checkpoint file, an MLflow run id, runs:/<id>, auto, or null",
    )


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; a named device must be available."""
    import torch

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
    """Yield ``(dotted.key, value)`` for every leaf of a resolved config, numbers canonical
    (:func:`canonical`: ``T=4`` and ``T: 4.0`` log alike)."""
    if isinstance(cfg, DictConfig):
        for key, value in cfg.items():
            yield from flatten(value, prefix + str(key) + ".")
    elif isinstance(cfg, ListConfig) and any(isinstance(v, (DictConfig, ListConfig)) for v in cfg):
        for i, value in enumerate(cfg):
            yield from flatten(value, f"{prefix}{i}.")
    elif isinstance(cfg, ListConfig):
        yield prefix[:-1], canonical(list(cfg))
    else:
        yield prefix[:-1], canonical(cfg)


#: Top-level keys that change how a run is executed or recorded, not what it computes.
EXECUTION_KEYS = (
    "tracking",
    "device",
    "log_every",
    "latency_repeats",
    "objective",
    "compile",
    "channels_last",
    "hydra",
    "resume",
    "checkpoint_every_steps",
    "reuse",
    "skip_finished",
    "export_onnx",
    "arm",  # issue 13: a preset's arm label and its paper's figures describe a run, not change it
    "paper",
)


def canonical(value: object) -> object:
    """``value`` with every number in one form, however it was typed, so that hashes, params and
    report rows agree: a float with an integer value becomes that int (``4.0`` and ``4``, ``1e3``
    and ``1000``), other floats keep Python's shortest repr (``1e-3`` and ``0.001`` are one float
    already). Lists, tuples and mappings are canonicalised item by item; bools stay bools.
    """
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 2**53:
            return int(value)
        return value
    if isinstance(value, Mapping):
        return {str(k): canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, ListConfig)):
        return [canonical(v) for v in value]
    return value


@functools.lru_cache(maxsize=1 << 16)
def canonical_text(text: str) -> str:
    """A param's text in canonical form (:func:`canonical`): ``"4.0"`` -> ``"4"``,
    ``"[256,256]"`` -> ``"[256, 256]"``; text that is not a number or a list of numbers and
    strings is returned as it is. For params logged before kdexp canonicalised them. Cached: a
    report over thousands of runs sees the same few values again and again."""
    stripped = text.strip()
    if not stripped or stripped[0] not in "-+.0123456789[(":
        return text
    try:
        value = ast.literal_eval(stripped)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text
    if isinstance(value, bool) or not isinstance(value, (int, float, list, tuple)):
        return text
    return str(canonical(value))


def digest(kept: dict) -> str:
    """A short, stable hash of a JSON-serialisable mapping (sorted keys), numbers canonical."""
    text = json.dumps(canonical(kept), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_hash(cfg: DictConfig) -> str:
    """A short, stable hash of everything in ``cfg`` that determines the trained model."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    return digest({k: v for k, v in resolved.items() if k not in EXECUTION_KEYS})


def pretrain_key(cfg: DictConfig) -> str:
    """The key under which a baseline trained from scratch is reused: model, dataset and seed.

    The schedule is left out on purpose: a sweep over a student's schedule reuses one teacher.
    """
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    return digest({k: resolved[k] for k in ("model", "dataset", "seed")})
