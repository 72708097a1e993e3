"""Features of any layer, named by module path and captured with forward hooks.

No model code is rewritten to expose a feature: ``FeatureTap(model, ["stages.1", "stages.2"])``
keeps the outputs of those modules from the model's most recent forward pass. The reserved path
``penultimate`` names the input of the model's last ``nn.Linear`` (the embedding the classifier
sees).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from kdexp.errors import ConfigError

PENULTIMATE = "penultimate"


def module_names(model: nn.Module) -> list[str]:
    """Every module path of ``model`` (the root excluded), plus ``penultimate``."""
    return [name for name, _ in model.named_modules() if name] + [PENULTIMATE]


def describe_modules(model: nn.Module, penultimate: bool = True, limit: int = 60) -> str:
    """The model's module paths as one line for an error message (the first ``limit``)."""
    names = [n for n in module_names(model) if penultimate or n != PENULTIMATE]
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


class FeatureTap:
    """Keeps the outputs of the named modules from the last forward pass, in order."""

    def __init__(self, model: nn.Module, paths: Sequence[str], key: str) -> None:
        """Hook ``paths`` of ``model``; an unknown path raises :class:`ConfigError` on ``key``."""
        self.paths = list(paths)
        self._outputs: dict[int, Tensor] = {}
        self._handles = []
        modules = dict(model.named_modules())
        for i, path in enumerate(self.paths):
            if path == PENULTIMATE:
                linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
                if not linears:
                    raise ConfigError(key, path, "a module path: this model has no nn.Linear")
                self._handles.append(linears[-1].register_forward_pre_hook(self._keep_input(i)))
            elif path in modules and path:
                self._handles.append(modules[path].register_forward_hook(self._keep_output(i)))
            else:
                raise ConfigError(
                    key,
                    path,
                    f"a module path of {type(model).__name__}: " + describe_modules(model),
                )

    def _keep_output(self, i: int):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            self._outputs[i] = output

        return hook

    def _keep_input(self, i: int):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, inputs: tuple) -> None:
            self._outputs[i] = inputs[0]

        return hook

    @property
    def features(self) -> list[Tensor]:
        """The captured features, one per path, from the most recent forward pass."""
        return [self._outputs[i] for i in range(len(self.paths))]

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
