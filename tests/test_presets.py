"""The paper presets' pieces: input jitter, method keys checked against the method, every arm of
every preset composing, and the measured-beside-published table (issue 13)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import get_class

from kdexp.dataset.augment import jitter
from kdexp.dataset.base import TensorLoader
from kdexp.errors import ConfigError
from kdexp.keys import accepted_keys, check_keys
from kdexp.method.base import RUNTIME_ARGS, needs_of
from kdexp.paper import mean_std, paper_rows, paper_table
from kdexp.pretrained import baseline_config
from kdexp.tracking.query import RunRecord
from tests.conftest import CONF

ARMS = sorted(
    str(p.relative_to(CONF / "arm").with_suffix("")) for p in (CONF / "arm").rglob("*.yaml")
)


def _shifts(image: torch.Tensor, p: int) -> list[torch.Tensor]:
    """Every translation by -p..p pixels of ``image`` (C×H×W), the border replicated."""
    h, w = image.shape[1:]
    padded = F.pad(image[None], (p, p, p, p), mode="replicate")[0]
    return [padded[:, y : y + h, x : x + w] for y in range(2 * p + 1) for x in range(2 * p + 1)]


def test_jitter_moves_each_image_by_at_most_two_pixels_with_background_kept() -> None:
    x = torch.full((64, 1, 6, 6), -0.42)  # a normalised MNIST background
    x[:, 0, 2, 3] = 2.8  # one stroke pixel
    out = jitter(x, max_shift=2, generator=torch.Generator().manual_seed(0))
    allowed = _shifts(x[0], 2)
    for image in out:
        assert any(torch.equal(image, s) for s in allowed)
        assert (image == 2.8).sum() <= 1 and image.min() == pytest.approx(-0.42)
    # 64 draws from 25 shifts: several distinct ones, and the image is not always left in place
    distinct = {tuple(torch.nonzero(image[0] == 2.8).flatten().tolist()) for image in out}
    assert len(distinct) >= 8


def test_tensor_loader_jitters_only_with_augment_jitter() -> None:
    x, y = torch.randn(10, 1, 8, 8), torch.arange(10)
    plain = next(iter(TensorLoader(x, y, batch_size=10, augment=None)))[0]
    assert torch.equal(plain, x)
    jittered = next(iter(TensorLoader(x, y, batch_size=10, augment="jitter", seed=1)))[0]
    assert not torch.equal(jittered, x)
    assert all(
        any(torch.equal(j, s) for s in _shifts(o, 2)) for j, o in zip(jittered, x, strict=True)
    )


def test_accepted_keys_follow_kwargs_up_to_the_base_class() -> None:
    names, open_ended = accepted_keys(get_class("kdexp.method.distill.kd.KD"))
    assert {"alpha", "T", "cache_teacher", "teacher", "data"} <= names and not open_ended
    names, _ = accepted_keys(get_class("kdexp.method.baseline.Baseline"))
    assert names == {"data", "criterion", "key", "distill", "teacher"}


def test_a_key_the_method_does_not_take_is_a_config_error(compose_cfg) -> None:
    cfg = compose_cfg("experiment=hinton_mnist", "method=baseline")
    with pytest.raises(ConfigError) as error:
        check_keys(cfg.method, "method", RUNTIME_ARGS)
    message = str(error.value)
    assert message.startswith("method.alpha=0.9") or message.startswith("method.T=20.0")
    # a baseline takes only a distill component: the message lists what it does take
    assert "kdexp.method.baseline.Baseline" in message and "it takes distill." in message


def test_kd_keys_pass_and_a_typo_names_the_accepted_keys(compose_cfg) -> None:
    cfg = compose_cfg("experiment=hinton_mnist", "+method.temperature=3")
    with pytest.raises(ConfigError, match=r"method.temperature=3: .* it takes .*T, alpha"):
        check_keys(cfg.method, "method", RUNTIME_ARGS)


@pytest.mark.parametrize("arm", ARMS)
def test_every_arm_composes_with_keys_its_method_takes(compose_cfg, arm: str) -> None:
    preset = arm.split("/")[0]
    cfg = compose_cfg(f"experiment={preset}", f"arm={arm}")
    assert cfg.arm == arm.split("/")[1]
    assert cfg.paper.citation
    uses_teacher = needs_of(cfg.method).teacher
    assert ("teacher" in cfg) == uses_teacher  # a teacher only where the method distils
    check_keys(cfg.method, "method", RUNTIME_ARGS)


def test_a_start_trained_for_an_arm_is_not_labelled_as_that_arm(compose_cfg) -> None:
    # transfer_mnist's source run used to carry the fine-tuning arm's label, interpolated as
    # "finetune_None_per_class" (its label budget is dropped): a start is no arm of the preset
    cfg = compose_cfg("experiment=transfer_mnist")
    assert cfg.arm == "finetune_5_per_class"
    start = baseline_config(cfg, cfg.model)
    assert "arm" not in start
    assert start.method._target_ == "kdexp.method.baseline.Baseline"
    assert start.paper == cfg.paper  # what describes the preset stays


def _record(arm: str, seed: int, acc: float, citation: str = "Someone 2015") -> RunRecord:
    params = {"paper.citation": citation, "arm": arm, "seed": str(seed)}
    params |= {"paper.metric": "test/acc1", "paper.arms.dense": "98.36"}
    metrics = {"test/acc1": acc, "best/val_acc1": acc + 1, "last/val_acc1": acc + 0.5}
    metrics |= {"model/params": 1000.0, "model/nonzero_params": 80.0 if arm == "pruned" else 1000.0}
    return RunRecord(f"r{arm}{seed}", "run", "FINISHED", {}, params, metrics)


def test_paper_table_gives_mean_std_per_arm_beside_published() -> None:
    runs = [_record("dense", s, a) for s, a in ((2, 97.0), (0, 98.0), (1, 99.0))]
    runs += [_record("pruned", s, a) for s, a in ((0, 96.0), (1, 97.0))]
    runs.append(RunRecord("x", "x", "FINISHED", {}, {"seed": "0"}, {"test/acc1": 50.0}))
    source = _record("dense", 0, 90.0)  # a starting model trained for another run
    source.tags = {"method": "baseline", "kdexp.trained_for": "checkpoint"}
    source.params["model"] = "other"
    rows = paper_rows([*runs, source])
    assert [(r.arm, r.seeds) for r in rows] == [
        ("baseline trained as checkpoint", ["0"]),
        ("dense", ["0", "1", "2"]),
        ("pruned", ["0", "1"]),
    ]
    table = paper_table(rows)
    # dense: mean 98, sample std 1 (by hand); published 98.36 -> difference -0.36
    dense = "| dense | 3 | 98.00 ± 1.00 | 98.00, 99.00, 97.00 | 99.00 ± 1.00 | 98.50 ± 1.00 |"
    assert dense + " 1.0× | 98.36 | -0.36 |" in table
    assert "| pruned | 2 | 96.50 ± 0.71 | 96.00, 97.00 |" in table and "12.5×" in table
    assert table.startswith("Published: Someone 2015")
    assert mean_std([]) == "—" and mean_std([1.0]) == "1.00"
