"""Pruning: weights (unstructured) or channels (structured) removed from a trained model on a
schedule, then fine-tuned; selected as ``method=prune/<name>``.

Unstructured criteria (:mod:`kdexp.method.prune.unstructured`): ``magnitude``, ``sensitivity``,
``taylor``, ``random``, ``l1_regularization``. Structured: ``channel``
(:mod:`kdexp.method.prune.channel`, Torch-Pruning's DepGraph) with a channel importance
(:mod:`kdexp.method.prune.importance`). Schedules (:mod:`kdexp.method.prune.schedule`):
``oneshot``, ``iterative``, ``agp``, ``linear``; schedules and importances are each a class and a
yaml in ``conf/method/prune/schedule/`` and ``conf/method/prune/importance/``.

An unstructured checkpoint loads into the dense architecture as is; a channel-pruned one through
:func:`load_pruned`.
"""

from kdexp.method.prune.base import Pruner
from kdexp.method.prune.channel import Channel
from kdexp.method.prune.unstructured import (
    L1Regularization,
    Magnitude,
    Random,
    Sensitivity,
    Taylor,
    Unstructured,
)
from kdexp.surgery import load_pruned

__all__ = [
    "Channel",
    "L1Regularization",
    "Magnitude",
    "Pruner",
    "Random",
    "Sensitivity",
    "Taylor",
    "Unstructured",
    "load_pruned",
]
