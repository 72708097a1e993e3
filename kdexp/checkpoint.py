"""Saving and loading weights. Every load is ``torch.load(weights_only=True)``: no arbitrary
unpickling, so a checkpoint crafted to run code is refused."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kdexp.errors import ConfigError


def save_checkpoint(path: Path, model: nn.Module, **info: int | float) -> None:
    """Write ``{"model": state_dict, **info}`` atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"model": model.state_dict(), **info}, tmp)
    tmp.replace(path)


def read_state_dict(path: str | Path, key: str) -> dict[str, torch.Tensor]:
    """The state_dict in ``path``: a plain state_dict or a kdexp checkpoint (its ``model`` entry).

    ``key`` is the config key that named the file, for the error message.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(
            key, str(path), f"an existing checkpoint file ({file.resolve()} is not one)"
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, corrupt, or holding objects beyond tensors
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            key, str(path), f"a checkpoint that torch.load(weights_only=True) reads ({reason})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(key, str(path), "a state_dict (a mapping of names to tensors)")
    return state


def load_weights(model: nn.Module, path: str | Path, key: str) -> None:
    """Load ``path`` into ``model``; fail clearly when the weights belong to another model."""
    state = read_state_dict(path, key)
    own = model.state_dict()
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
    model.load_state_dict(state)
