"""Checkpoints load only with weights_only=True and fail clearly when they do not fit."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from kdexp.checkpoint import load_weights, read_state_dict, save_checkpoint
from kdexp.errors import ConfigError


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("touch PWNED",))


def test_round_trip(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    save_checkpoint(tmp_path / "c.pt", model, epoch=4)
    other = nn.Linear(3, 2)
    load_weights(other, tmp_path / "c.pt", "checkpoint")
    assert torch.equal(other.weight, model.weight)
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed away


def test_malicious_pickle_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"model": _Evil()}))
    with pytest.raises(ConfigError, match="torch.load\\(weights_only=True\\)"):
        read_state_dict(path, "checkpoint")
    assert not (tmp_path / "PWNED").exists()


def test_truncated_checkpoint_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.pt"
    save_checkpoint(path, nn.Linear(30, 20))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ConfigError, match=f"checkpoint='{path}'"):
        read_state_dict(path, "checkpoint")


def test_weights_of_another_model_are_refused(tmp_path: Path) -> None:
    torch.save(nn.Linear(4, 2).state_dict(), tmp_path / "w.pt")
    with pytest.raises(ConfigError, match=r"wrong shape: weight \(2, 4\) vs \(2, 3\)"):
        load_weights(nn.Linear(3, 2), tmp_path / "w.pt", "checkpoint")
