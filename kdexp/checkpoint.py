"""Saving and loading weights. Every load is ``torch.load(weights_only=True)``: no arbitrary
unpickling, so a checkpoint crafted to run code is refused."""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdexp.errors import ConfigError
from kdexp.packed import quantized_kind, quantized_storage_quietly


def save_checkpoint(path: Path, model: nn.Module, **info: int | float) -> None:
    """Write ``{"model": state_dict, **info}`` atomically (temporary file, then rename)."""
    save_state(path, {"model": model.state_dict(), **info})


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically: a temporary file in the same folder, flushed, then renamed.

    A run killed while writing leaves the previous file intact, never a truncated one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def _load(path: str | Path, key: str, what: str) -> Any:
    """``torch.load(weights_only=True)`` of ``path``; a :class:`ConfigError` naming it otherwise."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(key, str(path), f"an existing {what} file ({file.resolve()} is not one)")
    try:
        with quantized_storage_quietly():  # an int8 checkpoint: torch's own deprecation
            return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, corrupt, or holding objects beyond tensors
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            key,
            str(path),
            f"a {what} that torch.load(weights_only=True) reads; {file.resolve()} is not "
            f"({reason})",
        ) from None


#: Entries every training checkpoint (``checkpoints/last.pt``) holds; see :mod:`kdexp.resume`.
TRAINING_STATE_KEYS = ("model", "optimizer", "scheduler", "rng", "epoch", "step", "batch")


def read_training_state(path: str | Path, key: str = "resume") -> dict[str, Any]:
    """The full training state in ``path`` (model, optimizer, RNG, position...), for resuming.

    Truncated or corrupt files, files holding anything beyond tensors and plain containers (a
    crafted pickle), and weights-only files raise a :class:`ConfigError` that names the file.
    """
    state = _load(path, key, "training checkpoint")
    missing = [k for k in TRAINING_STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ConfigError(
            key,
            str(path),
            "a training checkpoint (checkpoints/last.pt of a run); "
            f"{Path(path).expanduser().resolve()} lacks {', '.join(missing)}",
        )
    return state


def read_state_dict(
    path: str | Path, key: str, *, quantized: bool = False
) -> dict[str, torch.Tensor]:
    """The state_dict in ``path``: a plain state_dict or a kdexp checkpoint (its ``model`` entry).

    ``key`` is the config key that named the file, for the error message. The final model of a
    quantization run is refused with a message saying so, unless ``quantized`` is true (for
    :func:`kdexp.method.quantize.load_packed`).
    """
    state = _load(path, key, "checkpoint")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    kind = quantized_kind(state) if isinstance(state, dict) and not quantized else None
    if kind is not None:
        raise ConfigError(
            key,
            str(path),
            f"the weights of a float model; this file holds {kind} (the final model of a "
            "quantize/... run), which can be neither trained further nor used as a teacher: "
            "give the checkpoint of the run before quantization (its run id or its "
            "checkpoints/final.pt)",
        )
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(key, str(path), "a state_dict (a mapping of names to tensors)")
    return state


def load_weights(model: nn.Module, path: str | Path, key: str, skip: Collection[str] = ()) -> None:
    """Load ``path`` into ``model``; fail clearly when the weights belong to another model.

    Entries named in ``skip`` (a fine-tuned model's new classifier head) are neither required nor
    loaded: the model keeps its own values for them.
    """
    state = {k: v for k, v in read_state_dict(path, key).items() if k not in skip}
    own = {k: v for k, v in model.state_dict().items() if k not in skip}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mis_shaped = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mis_shaped:
        problems = []
        for label, names in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", mis_shaped),
        ):
            if names:
                problems.append(
                    f"{label}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                )
        raise ConfigError(
            key,
            str(path),
            f"weights of this model ({type(model).__name__}); this file does not fit it: "
            + "; ".join(problems),
        )
    model.load_state_dict(state, strict=not skip)
