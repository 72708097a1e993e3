"""The command line checked before Hydra starts: config mistakes answered by kdexp, exit status 2.

Hydra alone answers ``method=distill/kdd`` with only the group's top-level options, suggests
``+schedule.epoch=3`` for a misspelt key (which then trains with the unchanged ``epochs``), and
exits 1 for all of it. :func:`check_command_line` composes the command's config first, and raises
:class:`~kdexp.errors.ConfigError` for:

- an unknown option of a config group: the message lists every option of the group, nested ones
  included (``distill/kd``, ``prune/magnitude``, ...), the closest match first;
- an unknown key, typed (``schedule.epoch=3``) or added (``+schedule.epoch=3``): the message names
  the closest key of the config. Only *free-form* keys may be added (:func:`free_form`);
- any other error Hydra raises while composing (a bad override's syntax, a bad value for one of
  Hydra's own typed settings).

A multirun's sweeps are checked value by value for group options, and its first job's config is
composed. Commands that only ask Hydra something (``--help``, ``--info``, ``--cfg`` is checked)
and commands with their own config folder (``-cp``, ``-cd``) are left to Hydra.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Iterator, Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from kdexp.errors import ConfigError

#: Prefixes of keys that may be added with ``+``: Hydra's own settings (a launcher's or sweeper's
#: parameters, ``hydra.job.env_set.*``), which Hydra checks itself.
FREE_FORM_PREFIXES = ("hydra.",)
_CONFIG_MODULE = "kdexp.conf"


def free_form(cfg: DictConfig, key: str) -> bool:
    """Whether ``+key=...`` may add ``key`` to ``cfg``.

    Free-form keys are those under ``hydra.``, the keyword arguments of an instantiated object
    that its config leaves out (``+method.foo=1`` when the class named by ``method._target_``
    takes ``foo``), and in a pipeline a stage's setting of a key of the run's config
    (``+stages.teacher.schedule.epochs=3``).
    """
    if key.startswith(FREE_FORM_PREFIXES):
        return True
    stage = re.fullmatch(r"stages\.\w+\.(.+)", key)
    if stage and "pipeline" in cfg:  # a stage's settings merge over the run's config
        rest = stage.group(1)
        return _has_key(cfg, rest) or free_form(cfg, rest)
    parent, _, name = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else None
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return False
    return name in target_arguments(str(node._target_))


def target_arguments(target: str) -> set[str]:
    """The keyword arguments a ``_target_`` takes; a class's ``**kwargs`` are followed up its
    base classes (what ``super().__init__(**kwargs)`` passes on)."""
    from hydra.utils import get_method

    try:
        found: Any = get_method(target)
    except Exception:  # not importable: nothing may be added under it
        return set()
    chain = (
        [vars(c)["__init__"] for c in found.__mro__ if c is not object and "__init__" in vars(c)]
        if inspect.isclass(found)
        else [found]
    )
    names: set[str] = set()
    for function in chain:
        try:
            parameters = inspect.signature(function).parameters
        except (TypeError, ValueError):
            break
        names |= {
            n for n, p in parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        }
        if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            break
    return names - {"self"}


def group_options(group: str) -> list[str]:
    """Every option of a config group, nested groups' options as ``sub/name``, sorted."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.object_type import ObjectType

    from kdexp.choices import COMPONENT_GROUPS

    loader = GlobalHydra.instance().config_loader()
    found = [
        name
        for name in loader.get_group_options(group, results_filter=ObjectType.CONFIG)
        if not name.startswith("_")  # shared pieces (prune/_base), not options
    ]
    for sub in loader.get_group_options(group, results_filter=ObjectType.GROUP):
        if f"{group}/{sub}" not in COMPONENT_GROUPS:  # a schedule is no method
            found += [f"{sub}/{name}" for name in group_options(f"{group}/{sub}")]
    return sorted(found)


def _is_group(group: str) -> bool:
    from hydra.core.global_hydra import GlobalHydra

    loader: Any = GlobalHydra.instance().config_loader()
    return bool(loader.repository.group_exists(group))


def closest_first(value: str, choices: Sequence[str]) -> list[str]:
    """``choices`` with the closest matches to ``value`` (difflib) first, then the rest sorted."""
    close = difflib.get_close_matches(value, choices, n=len(choices), cutoff=0.5)
    return close + sorted(c for c in choices if c not in close)


def _keys(node: object, prefix: str = "") -> Iterator[str]:
    """Every dotted key of a config, inner nodes included."""
    if isinstance(node, DictConfig):
        for key in node.keys():
            path = f"{prefix}{key!s}"
            yield path
            try:
                child = node._get_node(key)
            except Exception:  # pragma: no cover - a broken node: its key is enough
                continue
            if isinstance(child, DictConfig | ListConfig):
                yield from _keys(child, path + ".")


def _closest_key(key: str, cfg: DictConfig) -> str:
    keys = [k for k in _keys(cfg) if not k.startswith("hydra.") or key.startswith("hydra.")]
    parent = key.rpartition(".")[0]
    node = OmegaConf.select(cfg, parent) if parent else None
    if isinstance(node, DictConfig) and "_target_" in node:  # arguments +key= may add
        keys += [f"{parent}.{name}" for name in sorted(target_arguments(str(node._target_)))]
    found = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not found:  # a misspelt last part under the right parent
        parent = key.rpartition(".")[0]
        siblings = [k for k in keys if k.rpartition(".")[0] == parent]
        found = difflib.get_close_matches(key, siblings, n=1, cutoff=0.0)
    return found[0] if found else ""


def _has_key(cfg: DictConfig, key: str) -> bool:
    parent, _, name = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if isinstance(node, DictConfig):
        return name in node
    if isinstance(node, ListConfig):
        return name.isdigit() and int(name) < len(node)
    return False


def _values(override: Any) -> list[Any]:
    """The values an override takes: one, or each of a choice or range sweep; none for an
    interval (a sweeper samples it)."""
    if override.is_interval_sweep():
        return []
    if override.is_sweep_override():
        return list(override.sweep_string_iterator())
    return [override.value()]


def _first(override: Any) -> str | None:
    """The override as its sweep's first job sees it; None for an interval sweep."""
    values = _values(override)
    if not values:
        return None
    if not override.is_sweep_override():
        return str(override.input_line)
    prefix = "++" if override.is_force_add() else "+" if override.is_add() else ""
    return f"{prefix}{override.get_key_element()}={values[0]}"


def _check_group(override: Any) -> None:
    group = override.key_or_group
    options = group_options(group)
    for value in _values(override):
        if value is None or str(value) in options or str(value) == "null":
            continue
        name = override.get_key_element()
        listed = closest_first(str(value), options)
        raise ConfigError(
            name, str(value), f"an option of the config group {group}: {', '.join(listed)}"
        )


def check_command_line(argv: Sequence[str]) -> None:
    """Raise :class:`ConfigError` for a mistake in the overrides of a ``kdexp`` command line.

    ``argv`` is the command line without the program name, as Hydra parses it.
    """
    from hydra import compose, initialize_config_module
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    args, _ = get_args_parser().parse_known_args(list(argv))
    if (
        args.help
        or args.hydra_help
        or args.info
        or args.shell_completion
        or args.config_path
        or args.config_dir
        or args.experimental_rerun
    ):
        return
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(_CONFIG_MODULE, version_base="1.3"):
            try:
                overrides = OverridesParser.create().parse_overrides(list(args.overrides))
            except HydraException as error:
                raise ConfigError("override", " ".join(args.overrides), str(error)) from None
            groups = [
                o for o in overrides if "." not in o.key_or_group and _is_group(o.key_or_group)
            ]
            for override in groups:
                _check_group(override)
            keys = [o for o in overrides if o not in groups and not o.is_delete()]
            first_groups = [f for f in map(_first, groups) if f is not None]
            name = args.config_name or "train"
            every = [f for f in map(_first, overrides) if f is not None]
            if not any(o.is_add() or o.is_force_add() for o in keys):
                # Hydra's config is in struct mode: a compose that takes every override has no
                # unknown key for the checks below to find. One compose instead of two (0.1-0.3 s in
                # process); the checks below run only to explain a failure.
                try:
                    compose(name, overrides=every, return_hydra_config=True)
                    return
                except (HydraException, OmegaConfBaseException, AssertionError, ValueError):
                    pass
            try:
                base = compose(name, overrides=first_groups, return_hydra_config=True)
                for override in keys:
                    key = override.key_or_group
                    present = _has_key(base, key)
                    if present or (override.is_add() and free_form(base, key)):
                        continue
                    closest = _closest_key(key, base)
                    hint = f"did you mean {closest}? " if closest else ""
                    free = "; only keys under hydra. and an object's own arguments may be added"
                    raise ConfigError(
                        override.get_key_element(),
                        _first_value(override),
                        f"not a key of the config: {hint}"
                        f"(see them with: kdexp --cfg job){free if override.is_add() else ''}",
                    )
                compose(name, overrides=every, return_hydra_config=True)
            except ConfigError:
                raise
            except (HydraException, OmegaConfBaseException, AssertionError, ValueError) as error:
                message = _hydra_message(error)
                raise ConfigError("override", " ".join(args.overrides), message) from None
    finally:
        GlobalHydra.instance().clear()


def _first_value(override: Any) -> object:
    values = _values(override)
    return values[0] if values else str(override.input_line).partition("=")[2]


def _hydra_message(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return f"Hydra refused it: {text}"
