"""Checkpoints that resume a run exactly: write atomically, find the latest, keep the last K.

A checkpoint is a folder `checkpoints/<name>/` (name `step_<n>` or `final`):
    config.json, model.safetensors, tokenizer files   the policy as a plain Hugging Face folder
    trainer_state.pt                                  everything else the loop needs (see common.trainer)
The folder is written under a temporary name and renamed into place, so a crash or a full disk
while writing leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from common.models import write_atomically

log = logging.getLogger("rl_lab")

STATE_FILE = "trainer_state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found or read; the message names the path."""


def save_checkpoint(path: Path, *, model: torch.nn.Module, tokenizer: Any, state: dict[str, Any]) -> Path:
    """Write the policy (HF folder) and the trainer state into `path`, atomically."""

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        torch.save(state, folder / STATE_FILE)

    write_atomically(Path(path), write)
    return Path(path)


def load_checkpoint(path: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load the policy weights of checkpoint `path` into `model`; return its trainer state."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"resume: {path} is not a checkpoint (no {STATE_FILE})")
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
        saved = type(model).from_pretrained(path, dtype=next(model.parameters()).dtype)
    except Exception as err:  # a truncated or foreign file: say which one
        raise CheckpointError(f"resume: cannot read checkpoint {path}: {type(err).__name__}: {err}") from err
    model.load_state_dict(saved.state_dict())
    return state


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint folder was written at (read from its state file)."""
    return int(torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)["step"])


def find_latest(run_dir: Path) -> Path | None:
    """The complete checkpoint of `run_dir` with the highest step, or None."""
    folders = [p for p in (Path(run_dir) / "checkpoints").glob("*") if (p / STATE_FILE).is_file()]
    if not folders:
        return None
    return max(folders, key=checkpoint_step)


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step_<n> folders (final is never deleted); 0 keeps all."""
    if keep_last <= 0:
        return
    folders = [p for p in (Path(run_dir) / "checkpoints").glob("step_*") if re.fullmatch(r"step_\d+", p.name)]
    for old in sorted(folders, key=lambda p: int(p.name.split("_")[1]))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
