"""Checkpoints that resume a run exactly: write atomically, find the latest, keep the last K.

A checkpoint is a folder `checkpoints/<name>/` (name `step_<n>` or `final`):
    config.json, model.safetensors, tokenizer files   the policy as a plain Hugging Face folder
    adapter/                                          LoRA runs only: the adapter weights (peft format)
    trainer_state.pt                                  everything else the loop needs (see common.state)
A weights-only checkpoint (trainer.save_only_model) holds the same policy folder, but its
trainer_state.pt keeps only the step and the MODEL_ONLY flag: a resume from it stops with a
CheckpointError, as there is no optimizer or RNG state to continue from.
A LoRA policy is saved twice: merged (W0 + (alpha / r) B A) as the plain folder that scripts/eval.py
and `load_policy("hub", ...)` read without peft, and as its adapter alone, which is what a resume
loads (the frozen base weights come from the run's model config, as at the start of the run).
The folder is written under a temporary name and renamed into place, so a crash or a full disk
while writing leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from common.models import is_lora, load_lora_adapter, merged_copy, save_lora_adapter, write_atomically

log = logging.getLogger("rl_lab")

STATE_FILE = "trainer_state.pt"
ADAPTER_DIR = "adapter"
# trainer_state.pt of a weights-only checkpoint: {"step": n, MODEL_ONLY: True}
MODEL_ONLY = "model_only"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found or read; the message names the path."""


def save_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module,
    tokenizer: Any,
    state: dict[str, Any],
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the policy (HF folder; a LoRA policy merged, plus its adapter) and the trainer state into
    `path`, atomically. `weights`: the policy's whole state dict when `model` itself holds only a
    shard of it (FSDP; gathered by common.distributed.model_state_dict)."""

    def write(folder: Path) -> None:
        if is_lora(model):
            merged_copy(model).save_pretrained(folder)  # a transient full copy of the model
            save_lora_adapter(model, folder / ADAPTER_DIR)
        else:
            model.save_pretrained(folder, state_dict=weights)
        tokenizer.save_pretrained(folder)
        torch.save(state, folder / STATE_FILE)

    write_atomically(Path(path), write)
    return Path(path)


def load_checkpoint(path: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load the policy weights of checkpoint `path` into `model`; return its trainer state.

    For a LoRA checkpoint `model` must be LoRA-wrapped with the same rank, scale and target modules
    (and the same base weights): only the adapter is loaded.
    """
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"resume: {path} is not a checkpoint (no {STATE_FILE})")
    lora = (path / ADAPTER_DIR).is_dir()
    if lora != is_lora(model):
        # the optimizer state holds the adapters' or all weights' moments: the two do not mix
        kind, flag = ("a LoRA run", "true") if lora else ("a full fine-tuning run", "false")
        raise CheckpointError(f"resume: {path} was written by {kind}; resume with model.lora.enabled={flag}")
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
        if state.get(MODEL_ONLY):
            raise CheckpointError(
                f"resume: {path} holds the policy weights only (trainer.save_only_model=true), no "
                "optimizer or RNG state to continue from; start a new run from it with "
                f"model=hub model.name_or_path={path}"
            )
        if lora:
            load_lora_adapter(model, path / ADAPTER_DIR)
            check_lora_base(model, path)
        else:
            saved = type(model).from_pretrained(path, dtype=next(model.parameters()).dtype)
            model.load_state_dict(saved.state_dict())
    except CheckpointError:
        raise
    except Exception as err:  # a truncated or foreign file: say which one
        raise CheckpointError(f"resume: cannot read checkpoint {path}: {type(err).__name__}: {err}") from err
    return state


def check_lora_base(model: torch.nn.Module, path: Path) -> None:
    """Raise CheckpointError unless `model` (its adapter just loaded) merges to the checkpoint's
    saved weights: a LoRA resume takes its frozen base weights from the config, not the checkpoint,
    so a different base model (or tiny-model seed) would otherwise go unnoticed."""
    merged = merged_copy(model).state_dict()
    saved = {k: v for shard in sorted(path.glob("model*.safetensors")) for k, v in load_file(shard).items()}
    if not saved:
        raise CheckpointError(f"resume: {path} holds no model*.safetensors")
    for name, weight in saved.items():
        if not torch.allclose(merged[name], weight.to(merged[name].dtype), rtol=1e-4, atol=1e-5):
            raise CheckpointError(
                f"resume: the model's base weights differ from those of {path} (first: {name}); "
                "resume with the run's model settings"
            )


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint folder was written at (read from its state file)."""
    return int(torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)["step"])


def find_latest(run_dir: Path) -> Path | None:
    """The complete checkpoint of `run_dir` with the highest step, or None."""
    folders = [p for p in (Path(run_dir) / "checkpoints").glob("*") if (p / STATE_FILE).is_file()]
    if not folders:
        return None
    return max(folders, key=checkpoint_step)


def step_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """The step_<n> folders of `run_dir` as (n, folder), oldest first."""
    matches = (
        (re.fullmatch(r"step_(\d+)", p.name), p) for p in (Path(run_dir) / "checkpoints").glob("step_*")
    )
    return sorted((int(m.group(1)), p) for m, p in matches if m)


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step_<n> folders (final is never deleted); 0 keeps all."""
    if keep_last <= 0:
        return
    for _, old in step_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def remove_step_checkpoints(run_dir: Path, up_to: int) -> None:
    """Delete the step_<n> folders with n <= `up_to`: the final checkpoint, written at step `up_to`,
    supersedes them."""
    for step, folder in step_checkpoints(run_dir):
        if step <= up_to:
            shutil.rmtree(folder, ignore_errors=True)


def disk_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (apparent sizes, as `du -sb`; symbolic links not followed)."""
    return sum(
        os.lstat(os.path.join(root, name)).st_size for root, _, names in os.walk(folder) for name in names
    )
