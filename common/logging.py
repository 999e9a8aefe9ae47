"""Run logging: local JSONL files (always) and Weights & Biases (optional).

Every run writes, into its run directory:
    metrics.jsonl   one JSON object per step: {"step": s, "reward/mean": ..., ...}
    samples.jsonl   one JSON object per logged completion (prompt, response, reward terms)
W&B mirrors both (the samples as a table) when enabled. W&B failing to start or to log never stops
training: the failure is reported once and the local files carry on.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import resource
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("rl_lab")

SAMPLE_COLUMNS = ["step", "prompt", "response", "answer", "extracted", "correct", "format", "reward"]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports ru_maxrss in KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Start a new peak-memory window: Linux resets the process's high-water mark (VmHWM) to its
    current resident memory when 5 is written to /proc/self/clear_refs. False where that is not
    possible (another OS); `window_peak_rss_mb` then reports the lifetime peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def window_peak_rss_mb() -> float:
    """Peak resident memory since the last `reset_peak_rss`, in MB (VmHWM of /proc/self/status,
    in kB); the lifetime peak (`peak_rss_mb`) where /proc is not there."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return peak_rss_mb()
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return peak_rss_mb()


def wandb_logged_in() -> bool:
    """True when an API key is available (WANDB_API_KEY or `wandb login`'s ~/.netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
    return auth is not None


def resolve_wandb_mode(mode: str) -> str:
    """auto -> online when logged in, else offline; online / offline / disabled pass through."""
    if mode not in {"auto", "online", "offline", "disabled"}:
        raise ValueError(f"logger.mode={mode!r}; expected auto, online, offline or disabled")
    if mode == "auto":
        return "online" if wandb_logged_in() else "offline"
    return mode


def _jsonable(value: Any) -> Any:
    """Python floats for tensors / numpy scalars; NaN and inf become strings so the line stays valid JSON."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def drop_rows_after(path: Path, step: int) -> None:
    """Keep the rows of a JSONL log up to `step`: a resumed run rewrites the steps after its checkpoint.

    A line that does not read as a row (what a kill in the middle of a write leaves at the end of
    the file) is dropped with a warning naming it, as scripts/compare.py skips it. The kept rows go
    to a new file that is then renamed over the log, so a kill leaves the old file or the new one.
    """
    if not path.is_file():
        return
    kept, unreadable = [], []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row_step = json.loads(line)["step"]
        except (json.JSONDecodeError, TypeError, KeyError):
            unreadable.append(line_no)
            continue
        if row_step <= step:
            kept.append(line)
    if unreadable:
        log.warning(
            "%s: dropped %d unreadable line(s) (line %s), e.g. a write cut short",
            path,
            len(unreadable),
            ", ".join(map(str, unreadable)),
        )
    if len(kept) == len(lines):
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as file:
        file.write("".join(line + "\n" for line in kept))
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


class LogWriteError(RuntimeError):
    """metrics.jsonl or samples.jsonl cannot be written (a full disk, a folder gone read-only)."""


def write_line(file: Any, text: str) -> None:
    """Append `text` to an open log file and flush it; an OSError becomes a one-line LogWriteError."""
    try:
        file.write(text)
        file.flush()
    except OSError as err:
        raise LogWriteError(f"cannot write {file.name}: {err.strerror or err}") from err


@dataclass(frozen=True)
class WandbInit:
    """Where and how W&B files a run: wandb.init's project, entity, group (the experiment), name,
    job_type (the arm: the algorithm or a named variant of it), tags and config (the resolved config)."""

    project: str
    entity: str | None
    group: str | None = None
    name: str | None = None
    job_type: str | None = None
    tags: tuple[str, ...] = ()
    config: dict | None = None


class RunLogger:
    """One `log(step, metrics)` per step, `log_samples(step, rows)` for completions, `finish()` at the end.

    `mode` is logger.mode (auto / online / offline / disabled); `run_id` continues the W&B run of a
    resumed checkpoint, and `resume_step` drops the local rows a resumed run writes again.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        backend: str = "none",
        mode: str = "disabled",
        wandb_init: WandbInit | None = None,
        run_id: str | None = None,
        resume_step: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            for name in ("metrics.jsonl", "samples.jsonl"):
                drop_rows_after(self.run_dir / name, resume_step)
        self._metrics = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self._samples = open(self.run_dir / "samples.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self.wandb_run = None
        if backend == "wandb":
            if wandb_init is None:
                raise ValueError("logger.backend=wandb needs wandb_init (logger.project, logger.entity, ...)")
            init = asdict(wandb_init)
            self._start_wandb(mode=resolve_wandb_mode(mode), run_id=run_id, **init)
        elif backend != "none":
            raise ValueError(f"logger.backend={backend!r}; expected wandb or none")

    def _start_wandb(self, *, mode: str, **kwargs: Any) -> None:
        if mode == "disabled":
            return
        try:
            import wandb

            run_id = kwargs.pop("run_id")
            self.wandb_run = wandb.init(
                dir=str(self.run_dir),
                mode=mode,
                id=run_id,
                resume="allow" if run_id else None,
                settings=wandb.Settings(silent=True),
                **kwargs,
            )
            # every metric plots against the step by default; the compute axes (generated samples and
            # tokens, wall time) are logged on every row, so any of them can be chosen as x-axis
            self.wandb_run.define_metric("train/step")
            self.wandb_run.define_metric("*", step_metric="train/step")
            for axis in ("sampling/samples_total", "sampling/tokens_total", "perf/wall_s"):
                self.wandb_run.define_metric(axis, step_metric="train/step", summary="max")
            self.wandb_run.define_metric("eval/accuracy", step_metric="train/step", summary="max,last")
            log.info("W&B run %s (%s mode) in %s", self.wandb_run.id, mode, self.run_dir / "wandb")
        except Exception as err:  # W&B must never stop training
            log.warning("W&B could not start (%s: %s); logging to local files only", type(err).__name__, err)
            self.wandb_run = None

    @property
    def wandb_run_id(self) -> str | None:
        return None if self.wandb_run is None else self.wandb_run.id

    def _wandb_call(self, fn, *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as err:
            log.warning(
                "W&B logging failed (%s: %s); continuing with local files only", type(err).__name__, err
            )
            self.wandb_run = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        write_line(self._metrics, json.dumps(row) + "\n")
        if self.wandb_run is not None:
            self._wandb_call(self.wandb_run.log, {**metrics, "train/step": step}, step=step)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """rows: dicts with the keys of SAMPLE_COLUMNS (step is added here)."""
        lines = (json.dumps({"step": step, **{k: _jsonable(v) for k, v in row.items()}}) for row in rows)
        write_line(self._samples, "".join(line + "\n" for line in lines))
        if self.wandb_run is not None:
            import wandb

            table = wandb.Table(columns=SAMPLE_COLUMNS)
            for row in rows:
                table.add_data(step, *[_jsonable(row.get(c)) for c in SAMPLE_COLUMNS[1:]])
            self._wandb_call(self.wandb_run.log, {"samples/completions": table}, step=step)

    def finish(self, exit_code: int = 0) -> None:
        for file in (self._metrics, self._samples):
            try:
                file.close()
            except OSError as err:  # what could not be written was reported when it failed
                log.warning("closing %s failed (%s)", file.name, err)
        if self.wandb_run is not None:
            self._wandb_call(self.wandb_run.finish, exit_code=exit_code)
            self.wandb_run = None
