"""A run folder holds one run: its identity (the settings that define what is trained, recorded at
its first start in `identity.json`) and a lock while a process uses it.

A resume (`resume=auto`, `resume=PATH`) under settings whose values differ from the recorded ones
is another experiment, not a continuation: `check_identity` refuses it in one line naming each key,
old and new. Every setting defines the run except those in `RESUMABLE_KEYS` (logging, checkpoint
cadence, budgets, threads, the learning rate, the speed switches that leave the update's values
as they are), which a resume applies. So a key added to the config is part of the identity until
it is listed there: nothing a resume changes is ever silently ignored.

The lock is an `fcntl.flock` on `<run>/.lock` (holding the pid, for the message), taken for the whole
run: the kernel drops it when the process dies, so the lock of a killed run is never stale.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common.config_checks import ConfigError

IDENTITY_FILE = "identity.json"
LOCK_FILE = ".lock"

# Keys (and prefixes: a group's every key) a resume may change; it applies their new values. The
# rest of the config defines the run (docs/runs.md lists both)
RESUMABLE_KEYS = (
    "resume",
    "objective",
    "paths",
    "logger",
    "trainer.max_steps",
    "trainer.max_generated_tokens",
    "trainer.eval_every",
    "trainer.eval_num_prompts",
    "trainer.log_samples_every",
    "trainer.num_samples_logged",
    "trainer.save_every",
    "trainer.keep_last_checkpoints",
    "trainer.keep_step_checkpoints",
    "trainer.save_only_model",
    "trainer.max_bad_steps",
    "trainer.checkpoint_signals",
    "trainer.device",
    "trainer.num_threads",
    "trainer.ddp_backend",
    "trainer.fail_on_reward_error",
    "trainer.log_rollout_mismatch",
    # how the update's sums are split (same gradient up to float summation order)
    "trainer.micro_batch_size",
    "trainer.max_tokens_per_micro_batch",
    "trainer.packed_forward",
    "trainer.chunked_logprobs",
    # the decode engine's speed switches (the same samples up to float summation order)
    "rollout.prepack_linears",
    "rollout.preallocated_cache",
    "rollout.inplace_row_removal",
    "rollout.shared_prefix",
    # activations recomputed in the backward pass: less memory, the same gradient
    "model.gradient_checkpointing",
    # the step size: the optimizer's groups and the scheduler follow the config (common.state)
    "optim.lr",
    "optim.warmup_steps",
    "optim.max_grad_norm",
    "critic.lr",
)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys to leaf values; a list stays one value.

    Example: {"a": {"b": 1, "c": [2, 3]}} -> {"a.b": 1, "a.c": [2, 3]}
    """
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def resumable(key: str) -> bool:
    """`key` is one of RESUMABLE_KEYS or lies under one."""
    return any(key == k or key.startswith(f"{k}.") for k in RESUMABLE_KEYS)


def run_identity(config: dict[str, Any]) -> dict[str, Any]:
    """The settings of the resolved `config` that define the run: every leaf but the resumable ones."""
    return {k: v for k, v in flatten(config).items() if not resumable(k)}


def identity_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key old -> new` for each key of the recorded identity `old` whose value differs in `new`. A key
    only `new` has is a setting added to the code since the run started: not a change of the run."""
    return [f"{k} {old[k]!r} -> {new.get(k, '(unset)')!r}" for k in old if new.get(k, "(unset)") != old[k]]


def read_identity(run_dir: Path) -> dict[str, Any] | None:
    """The identity recorded in `run_dir`, or None when the folder has none."""
    path = Path(run_dir) / IDENTITY_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))["identity"]
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"resume: cannot read {path} ({type(err).__name__}: {err})") from err


def record_identity(run_dir: Path, identity: dict[str, Any]) -> None:
    """Write `identity` to `run_dir`/identity.json (a new file, then renamed over the name)."""
    path = Path(run_dir) / IDENTITY_FILE
    tmp = path.with_name(f".{IDENTITY_FILE}.tmp-{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps({"identity": identity}, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def holds_run(run_dir: Path) -> bool:
    """`run_dir` holds (part of) a run: an identity, a checkpoint or a logged step."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    checkpoints = run_dir / "checkpoints"
    return (
        (run_dir / IDENTITY_FILE).is_file()
        or (checkpoints.is_dir() and any(checkpoints.iterdir()))
        or (metrics.is_file() and metrics.stat().st_size > 0)
    )


def identity_error(resume: str | None, run_dir: Path, identity: dict[str, Any]) -> str | None:
    """Why a start would mix two runs in `run_dir`, or None (reads only; see `check_identity`)."""
    run_dir = Path(run_dir)
    if not resume and holds_run(run_dir):
        return (
            f"hydra.run.dir: {shlex.quote(str(run_dir))} holds a run already; continue it with resume=auto, "
            "or start the new run in another folder (another hydra.run.dir)"
        )
    source = run_dir if resume in (None, "auto") else Path(resume).resolve().parent.parent
    recorded = read_identity(source) if resume else None
    if recorded is not None and (changes := identity_changes(recorded, identity)):
        return (
            f"resume={resume}: the run in {shlex.quote(str(source))} was started with other settings: "
            f"{'; '.join(changes)}; resume with the run's values, or start a new run in another folder "
            "(another hydra.run.dir, without resume=)"
        )
    return None


def check_identity(resume: str | None, run_dir: Path, identity: dict[str, Any]) -> None:
    """Refuse a start that would mix two runs, and record the identity of a new one.

    resume null: `run_dir` must not hold a run. resume=auto: the identity recorded in `run_dir` must
    equal `identity` on its keys. resume=PATH: that of the checkpoint's run folder (PATH/../..),
    when it has one. Raises ConfigError in one line: each changed key (old -> new) and how to start a
    new run instead."""
    if (error := identity_error(resume, run_dir, identity)) is not None:
        raise ConfigError(error)
    if read_identity(run_dir) is None:
        record_identity(run_dir, identity)


@contextlib.contextmanager
def run_folder_lock(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir`/.lock for the block (fcntl.flock, released by the kernel if the process dies).

    Raises:
        ConfigError: another live process holds it (its pid in the message).
    """
    path = Path(run_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ConfigError(
                f"hydra.run.dir: {shlex.quote(str(run_dir))} is in use by another run (pid {holder}); "
                "wait for it to end, or start in another folder (another hydra.run.dir)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
