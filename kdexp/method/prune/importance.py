"""Channel importance criteria for :class:`kdexp.method.prune.channel.Channel`.

Each criterion is a class here and a yaml in ``conf/method/prune/importance/`` (chosen with
``method/prune/importance@method.importance=<name>``, or the short ``method.importance=<name>``).
A criterion hands Torch-Pruning a group scorer (:meth:`ChannelImportance.scorer`), says whether
it needs calibration gradients, and may refuse groups it cannot score
(:meth:`ChannelImportance.unprunable`): ``bn_scale`` needs a BatchNorm in the group.

- :class:`L1`, :class:`L2`: the group's filter norms (Li et al. 2017, "Pruning Filters for
  Efficient ConvNets"), ||w_c||_p summed over the coupled layers.
- :class:`BNScale`: |γ_c| of the BatchNorm (Liu et al. 2017, network slimming).
- :class:`Taylor`: |Σ w·∂L/∂w| over ``calibration_batches`` batches (Molchanov et al. 2019).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch_pruning as tp
from torch import nn

from kdexp import choices
from kdexp.errors import ConfigError

GROUP = "method/prune/importance"
KEY = "method.importance"


class ChannelImportance:
    """Base of the channel importance criteria: a Torch-Pruning scorer of a pruning group."""

    name: ClassVar[str] = "importance"
    needs_gradients: ClassVar[bool] = False  # accumulate calibration gradients before scoring

    def scorer(self) -> tp.importance.Importance:
        """A callable ``scorer(group) -> Tensor`` of one score per channel (higher is kept)."""
        raise NotImplementedError

    def unprunable(self, group: Any) -> str:
        """Why this criterion cannot score ``group`` (a Torch-Pruning group), or ``""``."""
        return ""


class L1(ChannelImportance):
    """The L1 norm of each channel's weights over the group (Li et al. 2017)."""

    name: ClassVar[str] = "l1"

    def scorer(self) -> tp.importance.Importance:
        return tp.importance.GroupMagnitudeImportance(p=1)


class L2(ChannelImportance):
    """The L2 norm of each channel's weights over the group."""

    name: ClassVar[str] = "l2"

    def scorer(self) -> tp.importance.Importance:
        return tp.importance.GroupMagnitudeImportance(p=2)


class BNScale(ChannelImportance):
    """|γ| of the group's BatchNorm (Liu et al. 2017, network slimming); groups without one are
    left unpruned."""

    name: ClassVar[str] = "bn_scale"

    def scorer(self) -> tp.importance.Importance:
        return tp.importance.BNScaleImportance()

    def unprunable(self, group: Any) -> str:
        if any(isinstance(dep.target.module, nn.modules.batchnorm._BatchNorm) for dep, _ in group):
            return ""
        return f"its group has no BatchNorm for importance={self.name}"


class Taylor(ChannelImportance):
    """First-order Taylor importance |Σ w·∂L/∂w| (Molchanov et al. 2019), gradients summed over
    the calibration batches."""

    name: ClassVar[str] = "taylor"
    needs_gradients: ClassVar[bool] = True

    def scorer(self) -> tp.importance.Importance:
        return tp.importance.GroupTaylorImportance()


def build_importance(importance: Any) -> ChannelImportance:
    """The criterion ``method.importance`` gives: a name, a ``_target_`` node or an object."""
    built = choices.build(importance, GROUP, KEY)
    if not isinstance(built, ChannelImportance):
        raise ConfigError(
            KEY,
            importance,
            f"one of {', '.join(choices.options(GROUP))}, or a node whose _target_ is a "
            "kdexp.method.prune.importance.ChannelImportance",
        )
    return built
