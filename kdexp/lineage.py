"""Lineage: the key of the model a run produces, which lets a FINISHED run stand in for a new one.

A run's lineage key hashes its resolved config, less the keys that only change how it is executed
(:data:`kdexp.config.EXECUTION_KEYS`) and less the *names* of its inputs (``checkpoint``,
``teacher_checkpoint``), together with the lineage keys of those inputs:

- an input trained by kdexp (found or trained by ``auto``, or named by run id or ``runs:/``)
  carries the key of the run that trained it (its ``kdexp.lineage`` tag);
- an input read from a file carries the SHA-256 of the file's bytes.

Two runs with the same key train the same model from the same inputs. With ``reuse=auto`` a
FINISHED run with the key is taken instead of training again: for a teacher or a starting model
(``auto``), for each stage of a pipeline, and, with ``skip_finished=true``, for the job itself.
Re-running a pipeline with only its last stage changed therefore trains only that stage.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kdexp.config import EXECUTION_KEYS, digest

#: The MLflow tag holding a run's lineage key.
LINEAGE_TAG = "kdexp.lineage"
#: Config keys that name a run's inputs; their lineage replaces their value in the key.
INPUT_KEYS = ("checkpoint", "teacher_checkpoint")
#: Keys of a pipeline's config that are not part of any stage.
PIPELINE_KEYS = ("pipeline", "stages")


def lineage_key(cfg: DictConfig, inputs: Mapping[str, str]) -> str:
    """The lineage key of a run of ``cfg`` whose inputs have the lineage keys ``inputs``.

    ``inputs`` maps an input's config key (``checkpoint``, ``teacher_checkpoint``) to its lineage;
    an input the run does not have is left out.
    """
    dropped = (*EXECUTION_KEYS, *INPUT_KEYS, *PIPELINE_KEYS)
    kept = OmegaConf.masked_copy(cfg, [str(k) for k in cfg if k not in dropped])
    resolved = OmegaConf.to_container(kept, resolve=True)
    return digest({"config": resolved, "inputs": dict(sorted(inputs.items()))})


def file_key(path: Path) -> str:
    """The lineage of weights read from a file: ``sha256:`` and the digest of its bytes."""
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return "sha256:" + hasher.hexdigest()
