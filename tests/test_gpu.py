"""CUDA paths (run by scripts/gpu_check.sh with `pytest -m gpu`): a bf16 training run on one GPU and
sharded data parallel over NCCL on two. Skipped where torch sees no CUDA device."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from tests.test_cli import metrics, train_cli
from tests.test_distributed import TRAIN, _torchrun_train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_bf16_run_on_one_gpu_trains_float32_weights(tmp_path, cache_dir):
    """trainer.bf16 autocasts the forward passes only: the run's losses are finite and the saved
    weights are float32 and differ from the initial ones."""
    run_dir = tmp_path / "run"
    result = train_cli(
        *TRAIN[1:],
        f"hydra.run.dir={run_dir}",
        "trainer.device=cuda",
        "trainer.bf16=true",
        "trainer.max_steps=2",
        cache_dir=cache_dir,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    losses = [m["policy/loss"] for m in metrics(run_dir) if "policy/loss" in m]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    weights = load_file(run_dir / "checkpoints" / "final" / "model.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("zero_stage", [0, 3])
def test_torchrun_on_two_gpus_over_nccl(tmp_path, cache_dir, zero_stage):
    """DDP (stage 0) and FSDP FULL_SHARD (stage 3) on 2 GPUs with the NCCL backend: the global batch
    is 4 prompts x G=4 on every step and rank 0 writes a loadable checkpoint."""
    run_dir = tmp_path / "run"
    metrics = _torchrun_train(
        run_dir,
        cache_dir,
        "trainer.device=cuda",
        "trainer.ddp_backend=nccl",
        f"trainer.zero_stage={zero_stage}",
        "trainer.max_steps=2",
        "trainer.eval_every=0",
    )
    steps = [m for m in metrics if "policy/loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    assert all(m["rollout/num_sequences"] == 16 for m in steps)
    assert (run_dir / "checkpoints" / "final" / "model.safetensors").is_file()
