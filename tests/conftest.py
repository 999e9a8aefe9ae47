"""Shared fixtures: Hydra composition, the tiny model, and a tmp cache for the tokenizer.

Two environment variables change what a run's floats and samples are, to check that the suite does
not depend on them (docs/testing.md):
    RL_LAB_TEST_THREADS=N   torch CPU threads in the test process (other kernels, other sum orders)
    RL_LAB_TEST_SEED=S      the seed of the tests that sample a training run (default 0)
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig

from common.config import TrainerConfig, as_config_error
from common.fences import Fence
from common.models import load_policy
from scripts.build import build_settings, store_schemas

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# GSM8K files beside the checkout (never copied into it)
SHARED_GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"
# what the tests that sample a training run (and assert what any sample must give) are seeded with
TEST_SEED = int(os.environ.get("RL_LAB_TEST_SEED", "0"))


def pytest_configure(config: pytest.Config) -> None:
    if threads := os.environ.get("RL_LAB_TEST_THREADS"):
        torch.set_num_threads(int(threads))


def pytest_report_header(config: pytest.Config) -> str:
    return f"torch threads: {torch.get_num_threads()}, RL_LAB_TEST_SEED: {TEST_SEED}"


# a seconds-long run: the tiny random model on the char_share toy task, no W&B, no evaluation
TINY_RUN = (
    "model=tiny",
    "task=char_share",
    "logger=none",
    "trainer.eval_every=0",
    "trainer.batch_size=2",
    "group_size=g4",
    "rollout.max_new_tokens=8",
)


def compose_train(*overrides: str, hydra: bool = False) -> DictConfig:
    """Compose configs/train.yaml with overrides, as `python -m scripts.train` would: on the typed
    schemas, a value of the wrong type raising the ConfigError that the entry point prints.
    hydra=True keeps Hydra's own node (cfg.hydra: the sweeper's params, the launcher)."""
    store_schemas()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        try:
            return compose("train", overrides=list(overrides), return_hydra_config=hydra)
        except ConfigCompositionException as err:
            error = as_config_error(err)
            if error is None:
                raise
            raise error from err


def micro_batches(micro_batch_size: int, max_tokens: int | None = None) -> TrainerConfig:
    """configs/train.yaml's trainer section with the update's micro-batch split set: what
    common.update.accumulate_gradients reads (micro-batch rows and tokens, the pass switches)."""
    trainer = build_settings(compose_train()).trainer
    return dataclasses.replace(
        trainer, micro_batch_size=micro_batch_size, max_tokens_per_micro_batch=max_tokens
    )


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The user's cache when it already holds the converted files (fast), else a fresh tmp cache."""
    user_cache = Path(os.environ.get("RL_LAB_CACHE", Path.home() / ".cache" / "rl-lab"))
    if (user_cache / "smollm2-135m-instruct-tokenizer").is_dir():
        return str(user_cache)
    return str(tmp_path_factory.mktemp("rl-lab-cache"))


# the tiny Llama of the rollout and log-prob tests (smaller than configs/model/tiny.yaml)
TINY_POLICY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
EOS = 2  # SmolLM2's EOS (and pad) token id


@pytest.fixture(scope="module")
def tiny(cache_dir: str) -> tuple[torch.nn.Module, Any]:
    """The tiny random Llama with SmolLM2's tokenizer (left padding)."""
    return load_policy("tiny", cache_dir=cache_dir, tiny=TINY_POLICY, seed=0)


@pytest.fixture(scope="module")
def sharp(tiny: tuple[torch.nn.Module, Any]) -> tuple[torch.nn.Module, Any]:
    """The tiny model with an untied N(0, 1) LM head: peaked next-token distributions (the first
    token's top probability ~0.4-0.6) and greedy responses that differ between prompts, where the
    tiny model itself repeats one token."""
    model, tokenizer = tiny
    model = copy.deepcopy(model).eval()
    g = torch.Generator().manual_seed(0)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape, generator=g))
    return model, tokenizer


@pytest.fixture(autouse=True)
def _fresh_fences() -> None:
    """Every test sees the speed tricks' feature checks unprobed and their warnings not yet given
    (common.fences), so a test that takes an internal away sees its fallback and its one warning."""
    Fence.reset_all()
