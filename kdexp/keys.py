"""Config keys checked against the signature of the ``_target_`` they build.

Hydra's ``instantiate`` passes every key of a node to its target, so a key that the target does
not take surfaces as a raw ``TypeError: __init__() got an unexpected keyword argument`` once the
partial is called. A preset that sets ``method.T`` for distillation, run with ``method=baseline``,
is the typical case. :func:`check_keys` turns that into a :class:`~kdexp.errors.ConfigError`
naming the key, the target and the keys it accepts, before anything is built.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

from hydra.utils import get_method
from omegaconf import DictConfig

from kdexp.errors import ConfigError

_HYDRA_KEYS = frozenset({"_target_", "_partial_", "_recursive_", "_convert_", "_args_"})


def accepted_keys(target: Callable[..., Any]) -> tuple[set[str], bool]:
    """The keyword arguments ``target`` takes, and whether it takes any keyword at all.

    A class's ``__init__`` that forwards ``**kwargs`` to its base is followed up the MRO, so a
    subclass that passes its settings on (``KD(**kwargs)`` → ``Distiller``) lists its bases' too.
    """
    functions: Iterable[Callable[..., Any]]
    if inspect.isclass(target):
        functions = [c.__init__ for c in target.__mro__ if "__init__" in vars(c)]  # type: ignore[misc]
    else:
        functions = [target]
    names: set[str] = set()
    for function in functions:
        try:
            parameters = inspect.signature(function).parameters.values()
        except (TypeError, ValueError):  # a builtin without a signature: anything goes
            return names, True
        names |= {
            p.name
            for p in parameters
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"
        }
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return names, False
        if function is object.__init__:
            break
    return names, True


def check_keys(node: DictConfig, key: str, runtime: Iterable[str] = ()) -> None:
    """Raise :class:`ConfigError` for a key of ``node`` that its ``_target_`` does not take.

    ``key`` is the node's path in the config (``method``), for the message; ``runtime`` names the
    arguments the run passes at call time (``data``, ``criterion``, ``teacher``), which a config
    must not set and which the message leaves out of the accepted list.
    """
    target_name = node.get("_target_")
    if not isinstance(target_name, str):
        return
    target = get_method(target_name)
    names, open_ended = accepted_keys(target)
    passed = set(runtime)
    settable = sorted(names - passed)
    for name in (str(k) for k in node.keys()):
        if name in _HYDRA_KEYS or (open_ended and name not in passed):
            continue
        if name not in names or name in passed:
            raise ConfigError(
                f"{key}.{name}",
                node.get(name),
                f"not a setting of {target_name}; it takes "
                + (", ".join(settable) or "no settings")
                + f". Drop it (~{key}.{name}) or pick a method that takes it",
            )
