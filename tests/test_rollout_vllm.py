"""The optional vLLM engine: importable without vLLM, a clear error where it cannot run, and on a
GPU with vLLM the same batch layout and greedy text as the decode engine, also after a weight sync."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from common.rollout.vllm_engine import vllm_available
from scripts.build import ConfigError, validate
from tests.conftest import ROOT, compose_train

USABLE, REASON = vllm_available()


def test_importing_the_engine_does_not_import_vllm():
    code = "import sys, common.rollout.vllm_engine, scripts.build; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.skipif(USABLE, reason="vLLM and a GPU are present")
def test_vllm_engine_without_vllm_or_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match=r"rollout.engine: vllm: .*(not installed|CUDA)"):
        validate(compose_train("model=tiny", "rollout.engine=vllm"))


def test_unknown_engine_is_a_config_error():
    with pytest.raises(ConfigError, match="rollout.engine.*options: hf, decode, generate, vllm"):
        validate(compose_train("model=tiny", "rollout.engine=sglang"))


@pytest.mark.gpu
@pytest.mark.skipif(not USABLE, reason=f"needs vLLM on a GPU: {REASON}")
def test_vllm_matches_hf_greedy_and_follows_weight_updates(cache_dir):
    from common.models import load_policy
    from common.rollout import HFRollout
    from scripts.build import build_rollout

    cfg = compose_train("model=tiny", "rollout.engine=vllm", "group_size=g4", "rollout.max_new_tokens=12")
    model, tokenizer = load_policy("tiny", cache_dir=cache_dir, tiny=dict(cfg.model.tiny), seed=0)
    model.cuda()
    engine = build_rollout(cfg, model, tokenizer)
    hf = HFRollout(model, tokenizer, group_size=4, max_new_tokens=12)
    prompts = ["abc", "hello there"]
    batch = engine.sample(prompts)
    assert len(batch) == 8 and batch.group_index.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert batch.prompts_expanded == ["abc"] * 4 + ["hello there"] * 4
    assert torch.equal(batch.lengths, batch.response_mask.sum(1).long())
    for _ in range(2):  # greedy text agrees before and after a weight change
        greedy = engine.sample(prompts, group_size=1, do_sample=False)
        reference = hf.sample(prompts, group_size=1, do_sample=False)
        assert greedy.responses == reference.responses
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        engine.sync_weights(model)
