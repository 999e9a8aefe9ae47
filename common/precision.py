"""trainer.bf16=auto and rollout.dtype=auto: bfloat16 where it pays on this machine, float32 elsewhere,
decided once per run from a short in-process measurement and recorded with the run.

Whether bf16 pays depends on the hardware: on a 2-core AMD EPYC with avx512_bf16, bf16 autocast ran
the update 2.0x and the log-prob passes 2.95x faster than float32, and the bf16 rollout copy's decode
linears 1.2x (scripts/benchmark_precision.py, docs/performance.md); on an Intel AVX-512 Xeon without
bf16 units autocast bought nothing. So, as rollout.prepack_linears=auto does for prepacking
(common/rollout/prepack.py), auto times both on the model's own shapes, interleaved (float32, bf16,
float32, ...) so that a busy machine slows both alike:

  - trainer.bf16: forward + backward of a (rows, tokens) micro-batch with and without bfloat16
    autocast (the update: the smaller of the two gains measured, so the deciding one);
  - rollout.dtype: one forward of a (rows, 1) decode-sized input through the float32 policy and
    through its bf16 copy (common.rollout.base.weights_in), as a decode step runs.

The rule (`bf16_pays`): bf16 when the device has it (CUDA: torch.cuda.is_bf16_supported(); a CPU:
the measurement decides) and float32 / bf16 seconds >= MIN_SPEEDUP (1.3, a clear margin over
timing noise); float32 under trainer.portable_numerics (float32 kernels only, common/numerics.py).
The decision and its timings are logged once, written to the run folder (precision.json) and
carried in every checkpoint, so that a resumed run reuses it instead of measuring again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from common.rollout.base import ROLLOUT_DTYPES, weights_in
from common.rollout.prepack import prepacked_linears
from common.timing import clock

log = logging.getLogger("rl_lab")

# rollout.dtype: the fixed dtypes plus auto (trainer.bf16: true, false or auto)
ROLLOUT_DTYPE_SETTINGS = (*ROLLOUT_DTYPES, "auto")
# bf16 is picked when it runs at least this many times faster than float32
MIN_SPEEDUP = 1.3
PRECISION_FILE = "precision.json"


@dataclass(frozen=True)
class Timing:
    """Best seconds of one piece of work in float32 and in bf16 (`interleaved_best`)."""

    float32_s: float
    bf16_s: float

    @property
    def speedup(self) -> float:
        """float32 / bf16 seconds: > 1 when bf16 is faster."""
        return self.float32_s / self.bf16_s


def bf16_pays(
    timing: Timing | None, supported: bool, portable: bool, min_speedup: float = MIN_SPEEDUP
) -> bool:
    """Run in bf16? Only where the device has bf16 (`supported`), outside portable numerics, and
    when the measured speedup float32_s / bf16_s >= min_speedup. No timing (not measured): False.

    Example: 0.30 s float32, 0.15 s bf16 -> 2.0x >= 1.3: bf16; 0.30 s vs 0.25 s -> 1.2x: float32.
    """
    return supported and not portable and timing is not None and timing.speedup >= min_speedup


def bf16_supported(device: torch.device) -> bool:
    """Whether `device` runs bf16 at all: CUDA asks torch; on a CPU the measurement decides."""
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else True


def interleaved_best(run: Callable[[bool], None], device: torch.device, repeats: int) -> Timing:
    """Best seconds of run(False) (float32) and run(True) (bf16), called in turn float32, bf16,
    float32, ... `repeats` times each after one untimed call of each (the warm-up)."""
    best = {False: float("inf"), True: float("inf")}
    for i in range(repeats + 1):
        for bf16 in (False, True):
            t = clock(device)
            run(bf16)
            if i > 0:
                best[bf16] = min(best[bf16], clock(device) - t)
    return Timing(best[False], best[True])


def time_update(model: torch.nn.Module, rows: int, tokens: int, repeats: int = 2) -> Timing:
    """Forward + backward of a (rows, tokens) micro-batch of `model`, without and with bfloat16
    autocast (trainer.bf16). The gradients are cleared after; the weights are not changed."""
    device = next(model.parameters()).device
    ids = torch.zeros(rows, tokens, dtype=torch.long, device=device)  # (rows, tokens)

    def run(bf16: bool) -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids).logits  # (rows, tokens, vocab)
        torch.log_softmax(logits.float(), dim=-1).mean().backward()

    timing = interleaved_best(run, device, repeats)
    model.zero_grad(set_to_none=True)
    return timing


def time_rollout(model: torch.nn.Module, rows: int, repeats: int = 2) -> Timing:
    """One forward of a (rows, 1) input, as a decode step at `rows` live rows runs its linears,
    through `model` in float32 and through its bf16 copy (rollout.dtype=bfloat16).

    The float32 side is the faster of plain and prepacked linears (common/rollout/prepack.py), as
    the float32 rollout runs under rollout.prepack_linears=auto: timed against plain float32 alone,
    bf16 looked 3x faster on an AMD EPYC with avx512_bf16, where the prepacked float32 decode is
    within 1.2x of it. The bf16 copy is not prepacked (prepacking is float32 only)."""
    device = next(model.parameters()).device
    ids = torch.zeros(rows, 1, dtype=torch.long, device=device)  # (rows, 1)
    with weights_in(model, torch.bfloat16) as copy, torch.inference_mode():
        plain = interleaved_best(lambda bf16: (copy if bf16 else model)(input_ids=ids), device, repeats)
        with prepacked_linears(model, rows):  # a no-op off the CPU or without the oneDNN ops
            packed = interleaved_best(lambda bf16: (copy if bf16 else model)(input_ids=ids), device, repeats)
    return Timing(min(plain.float32_s, packed.float32_s), min(plain.bf16_s, packed.bf16_s))


@dataclass(frozen=True)
class PrecisionChoice:
    """What a run computes in: trainer.bf16 and rollout.dtype resolved, with the timings that decided
    them (None: not measured, the setting was fixed or float32 was forced)."""

    bf16: bool
    rollout_dtype: str
    update: Timing | None = None
    rollout: Timing | None = None

    def to_state(self) -> dict[str, Any]:
        """A plain dict for the checkpoint and precision.json."""
        return {**asdict(self), "min_speedup": MIN_SPEEDUP}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PrecisionChoice:
        """The inverse of `to_state`."""
        timings = {k: Timing(**state[k]) if state[k] else None for k in ("update", "rollout")}
        return cls(bool(state["bf16"]), str(state["rollout_dtype"]), **timings)

    def summary(self) -> str:
        """One line: each choice and the speedup behind it."""

        def why(timing: Timing | None) -> str:
            if timing is None:
                return "not measured"
            ms = f"float32 {1e3 * timing.float32_s:.1f} ms, bf16 {1e3 * timing.bf16_s:.1f} ms"
            return f"{ms}, {timing.speedup:.2f}x"

        return (
            f"trainer.bf16={str(self.bf16).lower()} (update: {why(self.update)}), "
            f"rollout.dtype={self.rollout_dtype} (decode step: {why(self.rollout)}); "
            f"bf16 where >= {MIN_SPEEDUP}x"
        )


@dataclass(frozen=True)
class Workload:
    """The shapes auto times: a training micro-batch (rows, tokens) and a decode step's rows."""

    rows: int
    tokens: int
    decode_rows: int


def resolve_precision(
    bf16: bool | str,
    rollout_dtype: str,
    model: torch.nn.Module,
    workload: Workload,
    portable: bool = False,
    recorded: dict[str, Any] | None = None,
    timers: tuple[Callable[..., Timing], Callable[..., Timing]] | None = None,
) -> PrecisionChoice:
    """trainer.bf16 and rollout.dtype with auto resolved: from `recorded` (a checkpoint's
    `PrecisionChoice.to_state`) when resuming, without measuring; else by `bf16_pays` on the
    timings of `timers` (update, rollout; default time_update, time_rollout) run on `model` at
    `workload`'s shapes. A fixed setting is kept as it is; auto is float32 without measuring under
    `portable` numerics and on a device without bf16."""
    if recorded is not None:
        before = PrecisionChoice.from_state(recorded)
        return PrecisionChoice(
            before.bf16 if bf16 == "auto" else bool(bf16),
            before.rollout_dtype if rollout_dtype == "auto" else rollout_dtype,
            before.update,
            before.rollout,
        )
    device = next(model.parameters()).device
    supported = bf16_supported(device)
    measure = supported and not portable
    update = rollout = None
    time_upd, time_roll = timers or (time_update, time_rollout)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # sampling unshifted
        if bf16 == "auto" and measure:
            update = time_upd(model, workload.rows, workload.tokens)
        if rollout_dtype == "auto" and measure:
            rollout = time_roll(model, workload.decode_rows)
    return PrecisionChoice(
        bf16_pays(update, supported, portable) if bf16 == "auto" else bool(bf16),
        ("bfloat16" if bf16_pays(rollout, supported, portable) else "float32")
        if rollout_dtype == "auto"
        else rollout_dtype,
        update,
        rollout,
    )


def record_precision(choice: PrecisionChoice, run_dir: Path, resumed: bool) -> None:
    """Log the choice once and write it to run_dir/precision.json (kept as it is on a resume)."""
    log.info("precision%s: %s", " (recorded, not measured again)" if resumed else "", choice.summary())
    path = run_dir / PRECISION_FILE
    if not (resumed and path.exists()):
        run_dir.mkdir(parents=True, exist_ok=True)  # Hydra makes it first; a run built by hand may not
        path.write_text(json.dumps(choice.to_state(), indent=2) + "\n")
