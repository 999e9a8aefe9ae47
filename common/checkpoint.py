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
A checkpoint counts only once it is complete. It is written under a temporary name
(`.<name>.tmp-*`), its completion marker `complete.json` ({"step": n}) is written last, and the
folder is then renamed into place; a folder is deleted by renaming it to `.<name>.del-*` first.
So a kill at any moment leaves every visible folder with a marker whole, and `resume=auto`
(`resume_candidates`, `load_newest`) reads only those: it clears the hidden folders a killed save
or deletion left (finishing a replacement cut between its two renames), and when the newest
checkpoint cannot be read it says so in one line and loads the newest one that can. Every file and
the folder are fsynced before the marker is written, the marker before the rename, and the parent
folder after it: only then are older checkpoints pruned, so after a power cut one is always whole.
Pruning (`prune_checkpoints`) deletes only complete checkpoints of steps before the one just
written; a resume from an older step (`set_aside_newer`) moves the newer ones out of the way.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from common.finite import first_non_finite, named_tensors
from common.models import is_lora, load_lora_adapter, merged_copy, save_lora_adapter, write_atomically

log = logging.getLogger("rl_lab")

STATE_FILE = "trainer_state.pt"
ADAPTER_DIR = "adapter"
# written last into a checkpoint folder: {"step": n}; a folder without it is not a checkpoint
COMPLETE_FILE = "complete.json"
# a visible checkpoint folder, and a hidden one left by a save (tmp, old) or a deletion (del)
CHECKPOINT_NAME = re.compile(r"step_(\d+)|final")
HIDDEN_NAME = re.compile(r"\.(step_\d+|final)\.(tmp|old|del)-.*")
# trainer_state.pt of a weights-only checkpoint: {"step": n, MODEL_ONLY: True}
MODEL_ONLY = "model_only"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found or read; the message names the path."""


class UnreadableCheckpointError(CheckpointError):
    """A checkpoint whose files cannot be read (truncated, corrupt): resume=auto tries an older one."""


class NonFiniteCheckpointError(CheckpointError):
    """A checkpoint refused before writing: a weight or a state tensor holds a NaN or an infinity."""


def save_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module,
    tokenizer: Any,
    state: dict[str, Any],
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the policy (HF folder; a LoRA policy merged, plus its adapter) and the trainer state into
    `path`, atomically, its completion marker last. `weights`: the policy's whole state dict when
    `model` itself holds only a shard of it (FSDP; gathered by common.distributed.model_state_dict).

    Raises:
        NonFiniteCheckpointError: a weight or a tensor of `state` (optimizer moments, the critic)
            holds a NaN or an infinity; nothing is written, the previous checkpoints stay.
    """
    tensors = chain(
        named_tensors(model.state_dict() if weights is None else weights, "model"), named_tensors(state)
    )
    if (bad := first_non_finite(tensors)) is not None:
        raise NonFiniteCheckpointError(f"{bad} holds a NaN or an infinity")

    def write(folder: Path) -> None:
        if is_lora(model):
            merged_copy(model).save_pretrained(folder)  # a transient full copy of the model
            save_lora_adapter(model, folder / ADAPTER_DIR)
        else:
            model.save_pretrained(folder, state_dict=weights)
        tokenizer.save_pretrained(folder)
        torch.save(state, folder / STATE_FILE)
        fsync_tree(folder)  # the files on disk before the marker says they are complete
        (folder / COMPLETE_FILE).write_text(json.dumps({"step": int(state["step"])}))  # last
        fsync_tree(folder, [folder / COMPLETE_FILE])

    write_atomically(Path(path), write)
    fsync_tree(Path(path).parent, [])  # the rename on disk before any older checkpoint goes
    return Path(path)


def fsync_tree(folder: Path, files: list[Path] | None = None) -> None:
    """fsync `files` (default: every file under `folder`), then `folder` and its subfolders: what was
    written there survives a power cut once this returns."""
    folders = [Path(root) for root, _, _ in os.walk(folder)]
    for path in files if files is not None else [f for d in folders for f in d.iterdir() if f.is_file()]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for path in folders if files is None else [folder]:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_checkpoint(path: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load the policy weights of checkpoint `path` into `model`; return its trainer state.

    For a LoRA checkpoint `model` must be LoRA-wrapped with the same rank, scale and target modules
    (and the same base weights): only the adapter is loaded.
    """
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise UnreadableCheckpointError(f"resume: {path} is not a checkpoint (no {STATE_FILE})")
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
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UnreadableCheckpointError(
            f"resume: cannot read checkpoint {path}: {type(err).__name__}: {first_line}"
        ) from err
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
    """The step a checkpoint folder was written at (its completion marker; else its state file)."""
    if (path / COMPLETE_FILE).is_file():
        return int(json.loads((path / COMPLETE_FILE).read_text())["step"])
    return int(torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)["step"])


def is_complete(folder: Path) -> bool:
    """A checkpoint folder whose completion marker was written (the last file of a save)."""
    return (folder / COMPLETE_FILE).is_file()


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints of `run_dir` (visible step_<n> / final folders with a marker),
    newest first (at equal steps `final` first). A visible folder without a marker is logged and
    left out: an older version wrote none (resume=PATH still loads it), or it was copied in part."""
    found = []
    for folder in sorted((Path(run_dir) / "checkpoints").glob("*")):
        if not (folder.is_dir() and CHECKPOINT_NAME.fullmatch(folder.name)):
            continue
        if not is_complete(folder):
            log.warning(
                "%s has no %s (incomplete, or written by an older version): skipped", folder, COMPLETE_FILE
            )
            continue
        try:
            found.append((checkpoint_step(folder), folder.name == "final", folder))
        except (OSError, ValueError, KeyError) as err:
            log.warning("%s: unreadable %s (%s): skipped", folder, COMPLETE_FILE, err)
    return [folder for *_, folder in sorted(found, key=lambda f: f[:2], reverse=True)]


def find_latest(run_dir: Path) -> Path | None:
    """The complete checkpoint of `run_dir` with the highest step, or None."""
    return next(iter(complete_checkpoints(run_dir)), None)


def remove_stale_folders(run_dir: Path) -> None:
    """Clear what a killed save or deletion left in `run_dir`/checkpoints: the hidden `.<name>.tmp-*`,
    `.old-*` and `.del-*` folders. A replacement cut between its two renames (the old folder moved
    aside, the new one not yet in place) is finished first: the newest complete hidden copy of a
    name with no visible folder (the new `tmp` one, else the `old` one) is renamed into place."""
    folder = Path(run_dir) / "checkpoints"
    hidden = [
        (m.group(1), m.group(2), p) for p in sorted(folder.glob(".*")) if (m := HIDDEN_NAME.fullmatch(p.name))
    ]
    for name, kind, path in sorted(hidden, key=lambda h: h[1] != "tmp"):  # tmp (newer) before old
        if kind != "del" and is_complete(path) and not (folder / name).exists():
            path.rename(folder / name)
            log.warning("finished an interrupted checkpoint write: %s", folder / name)
    stale = [path for *_, path in hidden if path.exists()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    if stale:
        log.info("removed %d temporary folder(s) left by an interrupted save in %s", len(stale), folder)


def resume_candidates(run_dir: Path) -> list[Path]:
    """What resume=auto may continue from: the complete checkpoints of `run_dir`, newest first, once
    the temporary folders of interrupted saves are cleared (`remove_stale_folders`)."""
    remove_stale_folders(run_dir)
    return complete_checkpoints(run_dir)


def load_newest(candidates: list[Path], model: torch.nn.Module) -> tuple[Path, dict[str, Any]]:
    """Load the first of `candidates` (newest first) that can be read into `model`; returns it and its
    trainer state. One that cannot be read is reported in one line and the next one is tried; any
    other CheckpointError (e.g. a weights-only checkpoint) stops the resume.

    Raises:
        CheckpointError: none of the candidates can be read.
    """
    for path in candidates:
        try:
            return path, load_checkpoint(path, model)
        except UnreadableCheckpointError as err:
            log.warning("%s; trying the next newest checkpoint", err)
    raise CheckpointError(
        f"resume=auto: none of the {len(candidates)} checkpoints in {candidates[0].parent} can be read "
        "into this model (the warnings above say why); resume with the run's model settings, choose a "
        "checkpoint with resume=PATH, or start a new run in another folder (another hydra.run.dir)"
    )


def step_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """The step_<n> folders of `run_dir` as (n, folder), oldest first."""
    matches = (
        (re.fullmatch(r"step_(\d+)", p.name), p) for p in (Path(run_dir) / "checkpoints").glob("step_*")
    )
    return sorted((int(m.group(1)), p) for m, p in matches if m)


def remove_checkpoint(folder: Path) -> None:
    """Delete a checkpoint folder: renamed to a hidden `.<name>.del-*` first, so a kill during the
    deletion never leaves a visible folder with part of its files."""
    hidden = folder.with_name(f".{folder.name}.del-{os.getpid()}-{time.monotonic_ns()}")
    try:
        folder.rename(hidden)
    except FileNotFoundError:
        return
    shutil.rmtree(hidden, ignore_errors=True)


def prune_checkpoints(run_dir: Path, written: Path, keep_last: int) -> None:
    """After checkpoint `written` (complete, on disk): keep it and the newest `keep_last` - 1 complete
    step_<n> folders of earlier steps, delete the other complete ones of earlier steps; 0 keeps all.
    A folder of a later step (an abandoned or unreadable one) or without its marker is never
    deleted here, nor is final, nor `written` itself."""
    if keep_last <= 0 or not re.fullmatch(r"step_\d+", Path(written).name):
        return
    step = checkpoint_step(written)
    older = [(n, p) for n, p in step_checkpoints(run_dir) if n < step and is_complete(p)]
    for _, old in older[: max(0, len(older) - (keep_last - 1))]:
        remove_checkpoint(old)


def set_aside_newer(run_dir: Path, loaded: Path, step: int) -> list[Path]:
    """Move the complete checkpoints of `run_dir` written after `step` (and a final), but `loaded`, into
    `run_dir`/checkpoints_set_aside/<time>/, out of resume=auto's way: a run resumed from an older
    step (resume=PATH) replaces what came after it. Returns their new paths."""
    newer = [
        p
        for p in complete_checkpoints(run_dir)
        if p.resolve() != Path(loaded).resolve() and (checkpoint_step(p) > step or p.name == "final")
    ]
    if not newer:
        return []
    target = Path(run_dir) / "checkpoints_set_aside" / time.strftime("%Y-%m-%d_%H-%M-%S")
    target.mkdir(parents=True, exist_ok=True)
    moved = [folder.rename(target / folder.name) for folder in newer]
    log.warning(
        "resumed from step %d: the later checkpoints %s moved to %s",
        step,
        ", ".join(p.name for p in newer),
        target,
    )
    return moved


def remove_step_checkpoints(run_dir: Path, up_to: int) -> None:
    """Delete the step_<n> folders with n <= `up_to`: the final checkpoint, written at step `up_to`,
    supersedes them."""
    for step, folder in step_checkpoints(run_dir):
        if step <= up_to:
            remove_checkpoint(folder)


def disk_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (apparent sizes, as `du -sb`; symbolic links not followed)."""
    return sum(
        os.lstat(os.path.join(root, name)).st_size for root, _, names in os.walk(folder) for name in names
    )
