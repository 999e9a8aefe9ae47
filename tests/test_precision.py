"""trainer.bf16=auto / rollout.dtype=auto (common/precision.py): the rule on fake timings, the
resolution of each setting, the config checks, a smoke run that records its decision and a resume
that reuses it without measuring."""

from __future__ import annotations

import json
import re

import pytest
import torch

import common.precision as precision
from common.checkpoint import STATE_FILE
from common.config import ConfigError
from common.precision import PrecisionChoice, Timing, Workload, bf16_pays, resolve_precision
from scripts.build import validate
from scripts.train import run
from tests.conftest import TINY_RUN, compose_train

WORKLOAD = Workload(rows=2, tokens=4, decode_rows=8)


@pytest.mark.parametrize(
    "timing, supported, portable, expected",
    [
        (Timing(0.30, 0.15), True, False, True),  # 0.30 / 0.15 = 2.0x >= 1.3: pays
        (Timing(0.39, 0.30), True, False, True),  # 0.39 / 0.30 = 1.3x: just pays
        (Timing(0.30, 0.25), True, False, False),  # 0.30 / 0.25 = 1.2x < 1.3: does not pay
        (Timing(0.30, 0.60), True, False, False),  # 0.5x: bf16 slower (a CPU without bf16 units)
        (Timing(0.30, 0.10), False, False, False),  # 3x, but CUDA without bf16
        (Timing(0.30, 0.10), True, True, False),  # 3x, but portable numerics: float32 only
        (None, True, False, False),  # not measured
    ],
)
def test_bf16_pays_only_past_the_margin_where_the_device_has_it(timing, supported, portable, expected):
    assert bf16_pays(timing, supported, portable) is expected


def fake_timers(update: Timing, rollout: Timing, calls: list[str]) -> tuple:
    def time_update(model, rows, tokens):
        calls.append(f"update {rows}x{tokens}")
        return update

    def time_rollout(model, rows):
        calls.append(f"rollout {rows}")
        return rollout

    return time_update, time_rollout


def test_auto_picks_each_from_its_own_timing_and_fixed_settings_are_not_measured():
    model, calls = torch.nn.Linear(2, 2), []
    timers = fake_timers(Timing(0.2, 0.1), Timing(0.12, 0.1), calls)  # update 2.0x, decode step 1.2x
    choice = resolve_precision("auto", "auto", model, WORKLOAD, timers=timers)
    assert (choice.bf16, choice.rollout_dtype) == (True, "float32")
    assert choice.update == Timing(0.2, 0.1) and choice.rollout == Timing(0.12, 0.1)
    assert calls == ["update 2x4", "rollout 8"]
    calls.clear()
    choice = resolve_precision(False, "bfloat16", model, WORKLOAD, timers=timers)
    assert (choice.bf16, choice.rollout_dtype, choice.update, choice.rollout) == (
        False,
        "bfloat16",
        None,
        None,
    )
    assert calls == []


def test_auto_is_float32_without_measuring_under_portable_numerics_and_without_bf16(monkeypatch):
    model, calls = torch.nn.Linear(2, 2), []
    timers = fake_timers(Timing(0.3, 0.1), Timing(0.3, 0.1), calls)  # 3x both: would pay
    choice = resolve_precision("auto", "auto", model, WORKLOAD, portable=True, timers=timers)
    assert (choice.bf16, choice.rollout_dtype) == (False, "float32")
    monkeypatch.setattr(precision, "bf16_supported", lambda device: False)  # as CUDA without bf16
    choice = resolve_precision("auto", "auto", model, WORKLOAD, timers=timers)
    assert (choice.bf16, choice.rollout_dtype) == (False, "float32")
    assert calls == []


def test_a_recorded_choice_is_reused_without_measuring():
    recorded = PrecisionChoice(True, "float32", Timing(0.2, 0.1), Timing(0.12, 0.1)).to_state()
    recorded = json.loads(json.dumps(recorded))  # as precision.json holds it

    def fail(*args):
        raise AssertionError("measured on a resume")

    choice = resolve_precision(
        "auto", "auto", torch.nn.Linear(2, 2), WORKLOAD, recorded=recorded, timers=(fail, fail)
    )
    assert choice == PrecisionChoice.from_state(recorded)
    assert choice.bf16 is True and choice.rollout_dtype == "float32"


def test_measuring_leaves_the_sampling_stream_alone(tiny):
    model, _ = tiny
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    resolve_precision("auto", "auto", model, WORKLOAD)
    assert torch.equal(torch.rand(3), expected)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("trainer.bf16=yes",), "trainer.bf16: not one of the options: true, false, auto (got 'yes')"),
        (("trainer.bf16=1",), "trainer.bf16: not one of the options: true, false, auto (got 1)"),
        (("rollout.dtype=float16",), "rollout.dtype: not one of the options: float32, bfloat16, auto"),
        (("trainer.bf16=auto", "trainer.zero_stage=2"), "trainer.bf16: auto is not measured on FSDP-sharded"),
    ],
)
def test_bad_precision_settings_fail_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        validate(compose_train(*overrides))


@pytest.mark.parametrize("bf16", ["auto", "true", "false"])
def test_auto_and_the_booleans_are_accepted_with_portable_numerics_taking_auto(bf16):
    cfg = compose_train(f"trainer.bf16={bf16}", "rollout.dtype=auto")
    validate(cfg)
    assert cfg.trainer.bf16 == {"auto": "auto", "true": True, "false": False}[bf16]
    validate(compose_train("trainer.portable_numerics=true", "trainer.num_threads=1", "trainer.bf16=auto"))


def test_smoke_run_records_its_choice_and_a_resume_reuses_it(tmp_path, cache_dir, monkeypatch):
    common = (
        *TINY_RUN,
        "trainer.bf16=auto",
        "rollout.dtype=auto",
        "trainer.num_threads=1",
        f"paths.cache_dir={cache_dir}",
    )
    run(compose_train(*common, "trainer.max_steps=1"), tmp_path)
    recorded = json.loads((tmp_path / "precision.json").read_text())
    assert recorded["update"]["float32_s"] > 0 and recorded["rollout"]["bf16_s"] > 0
    assert recorded["bf16"] is bf16_pays(Timing(**recorded["update"]), True, False)
    state = torch.load(tmp_path / "checkpoints" / "final" / STATE_FILE, weights_only=False)
    assert state["precision"] == recorded

    def fail(*args):
        raise AssertionError("measured on a resume")

    monkeypatch.setattr(precision, "time_update", fail)
    monkeypatch.setattr(precision, "time_rollout", fail)
    run(compose_train(*common, "trainer.max_steps=2", "resume=auto"), tmp_path)
    state = torch.load(tmp_path / "checkpoints" / "final" / STATE_FILE, weights_only=False)
    assert state["step"] == 2 and state["precision"] == recorded
