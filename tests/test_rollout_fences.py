"""The decode engine's speed tricks, each behind a switch and a feature check (common.fences): off or
without the internals it needs, the plain path runs, with one warning, and samples the same tokens."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from transformers.cache_utils import Cache, DynamicLayer

import common.rollout.decode as decode_module
from common.fences import Fence
from common.rollout import kv_cache, prepack
from common.rollout.decode import DecodeRollout, DecodeTricks
from common.rollout.kv_cache import PreallocatedLayer
from common.rollout.prepack import LinearTimes, PrepackPolicy, prepack_pays, time_linears

# configs/train.yaml's switches: every trick on
ALL_ON = DecodeTricks.from_train_yaml()
PROMPTS = ["q1", "a longer second question", "q3 with words", "four"]


class Spy:
    """Wraps decode_module.decode: records the cache's layer types, the in-place switch, and whether
    the LM head ran prepacked; and counts the forwards' input shapes (the first is the prefix pass
    when the shared prefix runs)."""

    def __init__(self, model):
        self.decode = decode_module.decode
        self.layers, self.in_place, self.prepacked, self.shapes = [], [], [], []
        self.hook = model.register_forward_pre_hook(
            lambda _m, _a, kw: self.shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True
        )
        self.model = model

    def __call__(self, model, cache, logits, attention_mask, **kwargs):
        self.layers.append({type(layer) for layer in cache.layers})
        self.in_place.append(kwargs["in_place"])
        self.prepacked.append("forward" in self.model.lm_head.__dict__)
        return self.decode(model, cache, logits, attention_mask, **kwargs)


def sample_both(model, tokenizer, tricks: DecodeTricks, monkeypatch) -> tuple[Spy, list]:
    """Greedy and seeded sampled batches of PROMPTS x G = 2 under `tricks`, twice each (the second
    rollout must not warn again), with a Spy on the decode loop."""
    spy = Spy(model)
    monkeypatch.setattr(decode_module, "decode", spy)
    engine = DecodeRollout(model, tokenizer, group_size=2, max_new_tokens=8, tricks=tricks)
    batches = []
    try:
        for _ in range(2):
            batches.append(engine.sample(PROMPTS, do_sample=False))
            torch.manual_seed(3)
            batches.append(engine.sample(PROMPTS))
    finally:
        spy.hook.remove()
    return spy, batches


def test_every_trick_is_on_by_default():
    # the switches' one source of defaults is configs/train.yaml: an engine built outside a run reads it
    assert DecodeTricks("auto", True, True, True) == ALL_ON


@pytest.fixture
def reference(sharp, monkeypatch):
    """The batches with every trick on (prepacking forced where oneDNN works)."""
    with monkeypatch.context() as m:
        spy, batches = sample_both(*sharp, dataclasses.replace(ALL_ON, prepack_linears="always"), m)
    assert PreallocatedLayer in spy.layers[0] and all(spy.in_place)
    return batches


def assert_same_tokens(batches, reference):
    """Same greedy tokens (top-2 logit gaps > 0.6 against rounding ~1e-6) and the same sampled
    tokens from the same seed (a token changes only for a draw within ~1e-6 of an edge)."""
    for ours, theirs in zip(batches, reference, strict=True):
        assert torch.equal(ours.input_ids, theirs.input_ids)
        torch.testing.assert_close(ours.rollout_logprob, theirs.rollout_logprob, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "tricks",
    [
        dataclasses.replace(ALL_ON, prepack_linears="never"),
        dataclasses.replace(ALL_ON, preallocated_cache=False),
        dataclasses.replace(ALL_ON, inplace_row_removal=False),
        dataclasses.replace(ALL_ON, shared_prefix=False),
        DecodeTricks("never", False, False, False),
    ],
)
def test_each_trick_switched_off_samples_the_same_tokens(sharp, reference, tricks, monkeypatch):
    spy, batches = sample_both(*sharp, tricks, monkeypatch)
    assert_same_tokens(batches, reference)
    assert not any(spy.prepacked) if tricks.prepack_linears == "never" else True
    if not tricks.preallocated_cache:
        assert all(PreallocatedLayer not in layers for layers in spy.layers) and not any(spy.in_place)
    if not tricks.inplace_row_removal:
        assert not any(spy.in_place)
    prefix_pass = [shape for shape in spy.shapes if shape[0] == 1 and shape[1] > 1]
    assert (len(prefix_pass) == 0) == (not tricks.shared_prefix)


def take_away_dynamic_layer(monkeypatch):
    monkeypatch.setattr(kv_cache, "DynamicLayer", None)  # as if transformers no longer had it


def break_prepacked_product(monkeypatch):
    monkeypatch.setattr(
        prepack, "packed_linear", lambda weight, bias, x: torch.zeros(x.shape[0], weight.shape[0])
    )


@pytest.mark.parametrize(
    ("take_away", "switch"),
    [
        (take_away_dynamic_layer, "rollout.preallocated_cache"),
        (
            lambda m: m.setattr(prepack, "REORDER_OP", "_reorder_linear_weight_gone"),
            "rollout.prepack_linears",
        ),
        (break_prepacked_product, "rollout.prepack_linears"),  # there, but computing something else
        (lambda m: m.delattr(Cache, "batch_repeat_interleave"), "rollout.shared_prefix"),
    ],
)
def test_missing_or_changed_internals_fall_back_with_one_warning(
    sharp, reference, take_away, switch, monkeypatch, caplog
):
    """Each trick's private internals taken away (or made to compute something else): the plain
    path runs, the same tokens come out, and one warning per process names the switch."""
    take_away(monkeypatch)
    Fence.reset_all()  # the reference rollouts probed the internals before they were taken away
    with caplog.at_level(logging.WARNING, logger="rl_lab"):
        spy, batches = sample_both(*sharp, dataclasses.replace(ALL_ON, prepack_linears="always"), monkeypatch)
    assert_same_tokens(batches, reference)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(switch), warnings
    if switch == "rollout.preallocated_cache":
        assert all(layers == {DynamicLayer} for layers in spy.layers) and not any(spy.in_place)
    if switch == "rollout.prepack_linears":
        assert not any(spy.prepacked)
    if switch == "rollout.shared_prefix":
        assert not [shape for shape in spy.shapes if shape[0] == 1 and shape[1] > 1]


def test_prepacking_pays_when_the_steps_save_more_than_the_reorder():
    # plain 30 ms, packed 20 ms, reorder 50 ms: 6 steps save 60 ms > 50 ms, 5 steps save exactly 50
    times = LinearTimes(plain_s=0.030, packed_s=0.020, reorder_s=0.050)
    assert prepack_pays(times, steps=6) and not prepack_pays(times, steps=5)
    # prepacked no faster (the Xeon of issue 26): never pays, whatever the steps
    assert not prepack_pays(LinearTimes(0.020, 0.021, 0.001), steps=1000)


def test_auto_prepacking_is_measured_once_per_run_and_logged(tiny, caplog):
    model, _ = tiny
    calls = []

    def fake_measure(linears, rows):
        calls.append(rows)
        # faster prepacked on 8 rows, slower on 2
        return LinearTimes(0.010, 0.005 if rows == 8 else 0.020, 0.001)

    policy = PrepackPolicy("auto", measure=fake_measure)
    if not prepack.PREPACKING.available():
        pytest.skip("oneDNN prepacking is not usable in this torch build")
    with caplog.at_level(logging.INFO, logger="rl_lab"):
        decisions = [policy.use(model, rows, 16) for rows in (8, 8, 2, 8, 2)]
    # the first rollout (8 rows) decides for the whole run: timings never make two rollouts differ
    assert decisions == [True] * 5 and calls == [8]
    assert policy.state_dict() == {"prepack_linears": True}
    logged = [r.getMessage() for r in caplog.records if "prepack_linears=auto" in r.getMessage()]
    assert len(logged) == 1 and logged[0].endswith("-> prepacked for the whole run")
    resumed = PrepackPolicy("auto", measure=fake_measure)  # a resumed run takes the checkpoint's
    resumed.load_state_dict({"prepack_linears": False})
    assert not resumed.use(model, 8, 16) and calls == [8]
    never, always = (
        PrepackPolicy("never", measure=fake_measure),
        PrepackPolicy("always", measure=fake_measure),
    )
    assert not never.use(model, 8, 16) and always.use(model, 8, 16) and calls == [8]
    with pytest.raises(ValueError, match="prepack_linears must be one of auto, always, never"):
        PrepackPolicy("on")


def test_time_linears_covers_every_linear_of_the_model(tiny):
    """The measurement (not its values: no timing asserts) weighs each distinct shape by its count."""
    model, _ = tiny
    if not prepack.PREPACKING.available():
        pytest.skip("oneDNN prepacking is not usable in this torch build")
    linears = prepack.cpu_linears(model)
    seen = []
    original = prepack.time_linear

    def counting(linear, rows, repeats):
        seen.append(tuple(linear.weight.shape))
        return original(linear, rows, repeats)

    prepack.time_linear = counting
    try:
        times = time_linears(linears, rows=4, repeats=1)
    finally:
        prepack.time_linear = original
    assert sorted(seen) == sorted({tuple(m.weight.shape) for m in linears})
    assert times.plain_s > 0 and times.packed_s > 0 and times.reorder_s > 0
