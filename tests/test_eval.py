"""scripts/eval.py: pass@k by hand, source and task resolution, and a run on the tiny model."""

import json

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from common.checkpoint import COMPLETE_FILE, STATE_FILE
from common.models import load_policy, save_hf
from scripts.eval import main, pass_at_k, resolve_source, task_config

FAST = ["--num-prompts", "4", "--k", "2", "--max-new-tokens", "8"]


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (2, 0, 2, 0.0),
        (2, 1, 2, 1.0),  # n = k: 1 as soon as one sample is correct
        (4, 1, 2, 0.5),  # 1 - C(3, 2) / C(4, 2) = 1 - 3/6
        (5, 2, 1, 0.4),  # pass@1 = c / n
        (5, 2, 3, 0.9),  # 1 - C(3, 3) / C(5, 3) = 1 - 1/10
        (5, 5, 5, 1.0),
    ],
)
def test_pass_at_k(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


@pytest.fixture(scope="module")
def model_dir(cache_dir, tmp_path_factory):
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    model, tokenizer = load_policy("tiny", cache_dir=cache_dir, tiny={**sizes, "num_key_value_heads": 1})
    return save_hf(model, tokenizer, tmp_path_factory.mktemp("eval") / "model")


def test_eval_on_a_model_folder(model_dir, tmp_path, capsys):
    out = tmp_path / "results" / "eval.json"
    result = main([str(model_dir), "--task", "addition", *FAST, "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert json.loads(capsys.readouterr().out) == result  # the same JSON on stdout
    assert (result["source"], result["task"], result["split"]) == (str(model_dir), "addition", "test")
    assert (result["num_prompts"], result["k"], result["n"], result["run_dir"]) == (4, 2, 2, None)
    metrics = result["metrics"]
    assert set(metrics) == {
        *(f"{s}/{m}" for s in ("greedy", "sampled") for m in ("accuracy", "format", "response_length")),
        *(f"{s}/truncated_frac" for s in ("greedy", "sampled")),
        "sampled/pass@2",
        "errors",
    }
    for key in ("accuracy", "format", "truncated_frac"):
        assert 0.0 <= metrics[f"greedy/{key}"] <= 1.0 and 0.0 <= metrics[f"sampled/{key}"] <= 1.0
    assert 1.0 <= metrics["greedy/response_length"] <= 8 and 1.0 <= metrics["sampled/response_length"] <= 8
    # pass@k is at least the share of correct samples; (4 prompts x 2 samples)
    assert metrics["sampled/accuracy"] <= metrics["sampled/pass@2"] <= 1.0
    assert metrics["errors"] == 0


def test_eval_refuses_a_model_with_non_finite_weights(model_dir, tmp_path):
    model, tokenizer = load_policy("hub", name_or_path=str(model_dir))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    save_hf(model, tokenizer, tmp_path / "nan")  # not save_checkpoint, which would refuse it
    with pytest.raises(
        SystemExit, match=r"^error: .*the weight model.layers.0.mlp.up_proj.weight holds a NaN"
    ):
        main([str(tmp_path / "nan"), *FAST])


def test_run_directory_uses_final_checkpoint_and_run_settings(model_dir, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    task = dict(name="addition", min_operand=1, max_operand=5, num_train=10, num_test=6, seed=3)
    rollout = dict(max_new_tokens=6, temperature=0.7, system_prompt="Answer briefly.")
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"task": task, "rollout": rollout}))
    model, tokenizer = load_policy("hub", name_or_path=str(model_dir))
    save_hf(model, tokenizer, run_dir / "checkpoints" / "final")

    result = main([str(run_dir), "--num-prompts", "50", "--k", "1"])
    assert result["model"] == str(run_dir / "checkpoints" / "final")
    assert result["run_dir"] == str(run_dir)
    assert result["task_args"]["max_operand"] == 5 and result["num_prompts"] == 6  # the run's test split
    assert (result["max_new_tokens"], result["temperature"]) == (6, 0.7)
    assert result["system_prompt"] == "Answer briefly."


def test_run_directory_without_final_uses_latest_checkpoint(tmp_path):
    for step in (3, 10, 7, 12):
        folder = tmp_path / "checkpoints" / f"step_{step}"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        torch.save({"step": step}, folder / STATE_FILE)
        if step != 12:  # step_12 has no completion marker: a save that did not finish
            (folder / COMPLETE_FILE).write_text(json.dumps({"step": step}))
    assert resolve_source(str(tmp_path)) == ("folder", tmp_path / "checkpoints" / "step_10", tmp_path)
    # a checkpoint inside a run still finds the run (for its task settings)
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("task: {name: addition}\n")
    step_3 = tmp_path / "checkpoints" / "step_3"
    assert resolve_source(str(step_3)) == ("folder", step_3, tmp_path)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: p, "neither a model folder"),
        (lambda p: (p / "checkpoints").mkdir() or p, "has no checkpoint"),
    ],
)
def test_bad_source_exits_with_a_message(tmp_path, make, message):
    with pytest.raises(SystemExit, match=message):
        main([str(make(tmp_path)), *FAST])


def test_task_from_config_file_with_overrides():
    kwargs = task_config("countdown", ["num_numbers=4", "strict=true"], None)
    assert (kwargs["name"], kwargs["num_numbers"], kwargs["strict"], kwargs["max_number"]) == (
        "countdown",
        4,
        True,
        99,
    )
    assert task_config(None, [], None)["name"] == "addition"


def test_task_override_on_a_run_config():
    cfg = OmegaConf.create({"task": {"name": "addition", "max_operand": 5}})
    assert task_config(None, ["seed=9"], cfg)["max_operand"] == 5  # the run's task, overridden
    assert task_config("countdown", [], cfg)["name"] == "countdown"  # another task: its own config


@pytest.mark.parametrize(
    "name, args, message",
    [
        ("nope", [], "unknown task 'nope'"),
        ("addition", ["max_operand"], "not KEY=VALUE"),
        ("addition", ["name=gsm8k"], "--task"),
        ("jsonl", [], "path"),  # a required option left unset
    ],
)
def test_bad_task_exits_with_a_message(name, args, message):
    with pytest.raises(SystemExit, match=message):
        task_config(name, args, None)


def test_task_error_exits_with_a_message(model_dir):
    with pytest.raises(SystemExit, match="unknown option 'no_such_key'"):
        main([str(model_dir), "--task-arg", "no_such_key=1", *FAST])
