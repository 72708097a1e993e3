"""Plain supervised training, the reference every compression method is compared with."""

from dataclasses import replace

from omegaconf import DictConfig

from kdexp.method.base import Method, Needs


class Baseline(Method):
    """Supervised training with cross-entropy: loss = CE(s, y) (optionally label-smoothed).

    Without a distill component its final model is the baseline that ``teacher_checkpoint=auto``
    and ``checkpoint=auto`` reuse.
    """

    @classmethod
    def needs(cls, cfg: DictConfig) -> Needs:
        """Nothing; a run of it is a reusable baseline unless it distils."""
        needs = super().needs(cfg)
        return replace(needs, is_baseline=not needs.teacher)
