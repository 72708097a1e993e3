"""Plain supervised training, the reference every compression method is compared with."""

from kdexp.method.base import Method


class Baseline(Method):
    """Supervised training with cross-entropy: loss = CE(s, y) (optionally label-smoothed)."""
