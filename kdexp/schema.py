"""The accepted type and range of every key of a composed config, read from the config tree.

A node with a ``_target_`` takes its keys' types from the annotations of what it builds (the
class's ``__init__`` along its bases, or the function), so a new option is type-checked with no
new line here. Keys without a target (the top level, ``schedule``) are listed in
:data:`TYPES`. Numeric ranges and choices are declared in :data:`RANGES`, by dotted key or by
the key's last part (``lr``, ``dropout``); ``tests/test_bad_input.py`` generates a wrong type and
an out-of-range value for every key of the composed configs, and fails for a numeric key with
no declared range, so every new key gets one.

:func:`check_tree` raises :class:`~kdexp.errors.ConfigError` naming the dotted key.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal, Union

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from kdexp.errors import ConfigError

#: Keys with no ``_target_`` to read a type from.
TYPES: dict[str, Any] = {
    "seed": int,
    "device": str,
    "deterministic": bool,
    "amp": str | None,
    "channels_last": bool,
    "compile": bool,
    "checkpoint": str | None,
    "teacher_checkpoint": str | None,
    "objective": str | list[str],
    "test_on": str,
    "log_every": int,
    "latency_repeats": int,
    "export_onnx": bool,
    "checkpoint_every_steps": int | None,
    "resume": str | None,
    "on_nonfinite": str,
    "reuse": str,
    "skip_finished": bool,
    "schedule.epochs": int,
    "schedule.batch_size": int,
    "schedule.lr": float,
    "schedule.label_smoothing": float,
    "schedule.grad_clip": float | None,
}


@dataclass(frozen=True)
class Range:
    """Accepted numbers: ``low``/``high`` bounds (None: unbounded), open or closed."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def accepts(self, value: float) -> bool:
        """Whether ``value`` lies in the range."""
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (
            self.high is not None and (value >= self.high if self.high_open else value > self.high)
        )

    def describe(self) -> str:
        """The range in words, for the error message."""
        if self.low is None and self.high is None:
            return "any number"
        if self.low == 0 and self.high is None:
            return "a positive number" if self.low_open else "a number >= 0"
        left = "(" if self.low_open else "["
        right = ")" if self.high_open else "]"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"a number in {left}{low}, {high}{right}"

    def outside(self) -> float | None:
        """A value just outside the range (for generated tests), or None if it is unbounded."""
        if self.low is not None:
            return self.low - 1
        if self.high is not None:
            return self.high + 1
        return None


@dataclass(frozen=True)
class CountOrFraction(Range):
    """A count (an integer >= 1) or a fraction in (0, 1): a split's size."""

    def accepts(self, value: float) -> bool:
        """Integers count, floats are fractions."""
        return value >= 1 if isinstance(value, int) else 0 < value < 1

    def describe(self) -> str:
        """The range in words."""
        return "a count >= 1, or a fraction in (0, 1)"

    def outside(self) -> float | None:
        """A negative count."""
        return -1


ANY = Range()
POSITIVE = Range(0, None, low_open=True)
NON_NEGATIVE = Range(0, None)
FRACTION = Range(0, 1)  # a weight or probability
OPEN_FRACTION = Range(0, 1, low_open=True, high_open=True)
UNDER_ONE = Range(0, 1, high_open=True)

#: Ranges by dotted key, else by the key's last part. ``ANY`` declares a number unbounded.
RANGES: dict[str, Range] = {
    "seed": ANY,
    "split_seed": ANY,
    "epochs": POSITIVE,
    "batch_size": POSITIVE,
    "lr": POSITIVE,
    "log_every": POSITIVE,
    "latency_repeats": POSITIVE,
    "system_metrics_every_s": POSITIVE,
    "checkpoint_every_steps": POSITIVE,
    "label_smoothing": UNDER_ONE,
    "grad_clip": POSITIVE,
    "num_classes": POSITIVE,
    "in_channels": POSITIVE,
    "channels": POSITIVE,
    "image_size": POSITIVE,
    "hidden": POSITIVE,
    "width": POSITIVE,
    "depth": POSITIVE,
    "dropout": UNDER_ONE,
    "val_size": CountOrFraction(),
    "test_size": CountOrFraction(),
    "classes": NON_NEGATIVE,
    "train_limit": POSITIVE,
    "alpha": FRACTION,
    "T": POSITIVE,
    "ce_weight": NON_NEGATIVE,
    "kd_weight": NON_NEGATIVE,
    "momentum": UNDER_ONE,
    "dampening": UNDER_ONE,
    "weight_decay": NON_NEGATIVE,
    "warmup_epochs": NON_NEGATIVE,
    "warmup_start": FRACTION,
    "min_factor": FRACTION,
    "gamma": POSITIVE,
    "milestones": NON_NEGATIVE,
    "flush_every_s": NON_NEGATIVE,
    "train_samples": POSITIVE,
    "test_samples": POSITIVE,
    "noise": NON_NEGATIVE,
    "data_seed": ANY,
    "num_workers": NON_NEGATIVE,
}

#: Strings from a fixed set, by dotted key or last part (Literal annotations need no entry).
CHOICES: dict[str, tuple[object, ...]] = {
    "amp": (None, "bf16", "fp16"),
    "test_on": ("best", "last"),
    "on_nonfinite": ("stop", "skip"),
    "reuse": ("auto", "never"),
    "cache_teacher": ("auto", True, False),
}

_RUN_ID = re.compile(r"[0-9a-f]{32}")
_SKIPPED = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")


def range_of(key: str) -> Range | None:
    """The declared range of a dotted key (by the key, else by its last part)."""
    return RANGES.get(key, RANGES.get(key.rsplit(".", 1)[-1]))


def choices_of(key: str, annotation: Any = None) -> tuple[object, ...] | None:
    """The accepted values of a key drawn from a fixed set, if it is one."""
    found = CHOICES.get(key, CHOICES.get(key.rsplit(".", 1)[-1]))
    if found is not None:
        return found
    literals = _literals(annotation)
    return tuple(literals) if literals else None


def _literals(annotation: Any) -> list[object]:
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    if _is_union(annotation):
        return [v for arg in typing.get_args(annotation) for v in _literals(arg)]
    return []


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (Union, types.UnionType)


@cache
def _target_hints(target: str) -> dict[str, Any]:
    """The annotated parameters of what ``target`` builds: a function's, or the ``__init__``
    of a class and its bases (a subclass passing ``**kwargs`` up)."""
    try:
        built = get_object(target)
    except Exception:
        return {}
    functions: list[Callable[..., Any]] = (
        [k.__init__ for k in inspect.getmro(built) if "__init__" in vars(k)]  # type: ignore[misc]
        if inspect.isclass(built)
        else [built]
    )
    hints: dict[str, Any] = {}
    for function in functions:
        try:
            found = typing.get_type_hints(function)
        except Exception:  # an annotation that does not evaluate on this Python
            continue
        for name, hint in found.items():
            hints.setdefault(name, hint)
    hints.pop("return", None)
    return hints


def expected_types(cfg: DictConfig) -> Iterator[tuple[str, Any, Any]]:
    """``(dotted key, value, annotation or None)`` for every leaf of ``cfg`` but ``hydra``."""

    def walk(node: Any, prefix: str, hints: Mapping[str, Any]) -> Iterator[tuple[str, Any, Any]]:
        assert isinstance(node, DictConfig)
        target = node.get("_target_") if "_target_" in node else None
        own = _target_hints(str(target)) if target else {}
        for key in node:
            name = str(key)
            if name in _SKIPPED or (not prefix and name in ("hydra", "stages", "pipeline")):
                continue
            dotted = prefix + name
            if OmegaConf.is_interpolation(node, name):
                continue  # ${dataset.num_classes}: the key it points at is checked, and named
            child = OmegaConf.select(node, name, throw_on_missing=False)
            if isinstance(child, DictConfig):
                yield from walk(child, dotted + ".", {})
                continue
            annotation = own.get(name, TYPES.get(dotted, hints.get(name)))
            yield dotted, child, annotation

    yield from walk(cfg, "", {})


def _matches(value: Any, annotation: Any) -> bool:
    """Whether ``value`` (from a config) has the annotated type; unknown types pass."""
    if annotation is None or annotation is Any or annotation is inspect.Parameter.empty:
        return True
    if annotation is type(None):
        return value is None
    origin = typing.get_origin(annotation)
    if _is_union(annotation):
        return any(_matches(value, arg) for arg in typing.get_args(annotation))
    if origin is Literal:
        return value in typing.get_args(annotation)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple, Sequence) or annotation in (list, tuple):
        if not isinstance(value, (ListConfig, list, tuple)):
            return False
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return not args or all(_matches(v, args[0]) for v in value)
    if origin in (dict, Mapping) or annotation is dict:
        return isinstance(value, (DictConfig, dict))
    return True  # a class (a module, a tensor): not a config value to check


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("collections.abc.", "")
    return text.removeprefix("<class '").removesuffix("'>")


def _numbers(value: Any) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, (ListConfig, list, tuple)):
        return [v for v in value if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return []


def check_tree(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first key whose value has the wrong type or lies
    outside its declared range or choices."""
    for key, value, annotation in expected_types(cfg):
        if not _matches(value, annotation):
            accepted = (
                "true or false"
                if annotation is bool
                else f"a value of type {_type_name(annotation)}"
            )
            raise ConfigError(key, value, accepted)
        choices = choices_of(key, annotation)
        if choices is not None and value is not None and value not in choices:
            raise ConfigError(key, value, "one of " + ", ".join(map(str, choices)))
        bounds = range_of(key)
        if bounds is not None:
            for number in _numbers(value):
                if not bounds.accepts(number):
                    raise ConfigError(key, value, bounds.describe())


#: Keys naming a file of weights or training state (besides a run id, runs:/ or auto).
WEIGHT_KEYS = ("checkpoint", "teacher_checkpoint", "resume")


#: Folders a run writes into: they may not exist yet, but must not be a file.
OUTPUT_PATHS = ("tracking.artifact_root",)


def is_path_key(key: str) -> bool:
    """Whether a dotted key names a file or folder: weight sources, and keys ending in
    ``root``, ``dir``, ``path`` or ``file``."""
    last = key.rsplit(".", 1)[-1]
    return key in WEIGHT_KEYS or last.endswith(("root", "dir", "path", "file"))


def _torch_file(path: Path) -> str | None:
    """Why ``path`` is not a file ``torch.save`` wrote (None when it looks like one)."""
    if not path.is_file():
        return "not a file" if path.exists() else "no such file"
    with path.open("rb") as handle:
        head = handle.read(4)
    if not head:
        return "an empty file"
    if head != b"PK\x03\x04" and head[:1] != b"\x80":  # torch.save's zip, or a legacy pickle
        return "not a file that torch.save wrote"
    return None


def check_paths(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for a path key naming a missing, empty or wrong-kind file."""
    for key, value, _ in expected_types(cfg):
        if not is_path_key(key) or value is None or not isinstance(value, str):
            continue
        if key in WEIGHT_KEYS:
            if value == "auto" or value.startswith("runs:/") or _RUN_ID.fullmatch(value):
                continue
            why = _torch_file(Path(value).expanduser())
            if why is not None:
                accepted = "auto, an MLflow run id, runs:/<id>, or a checkpoint file"
                raise ConfigError(key, value, f"{accepted} ({Path(value).resolve()}: {why})")
        elif key.endswith(("root", "dir")):
            path = Path(value).expanduser()
            download = OmegaConf.select(cfg, key.rsplit(".", 1)[0] + ".download", default=None)
            if path.exists() and not path.is_dir():
                raise ConfigError(key, value, f"a folder ({path.resolve()} is a file)")
            if not path.exists() and download is False:
                raise ConfigError(
                    key,
                    value,
                    f"an existing folder ({path.resolve()} does not exist), or "
                    f"{key.rsplit('.', 1)[0]}.download=true to fetch the data there",
                )
