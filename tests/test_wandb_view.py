"""scripts/wandb_view.py: the W&B workspace of a comparison, checked offline on the spec it builds."""

from __future__ import annotations

import json

import pytest

from scripts import wandb_view


def panels(spec: dict) -> dict[str, list[tuple[str, list[str]]]]:
    """section name -> [(x axis, metrics)] of its line plots."""
    sections = spec["spec"]["section"]["panelBankConfig"]["sections"]
    return {
        s["name"]: [(p["config"]["xAxis"], p["config"]["metrics"]) for p in s["panels"]] for s in sections
    }


def test_the_comparison_view_plots_accuracy_and_reward_against_step_tokens_and_time():
    spec = wandb_view.spec(wandb_view.build_workspace("compare", entity="me"))
    assert spec["entity"] == "me" and spec["project"] == "rl-lab"
    views = panels(spec)
    axes = ["_step", "sampling/tokens_total", "perf/wall_s"]  # W&B's backend name of Step is _step
    assert views["Held-out accuracy"] == [(x, ["eval/accuracy"]) for x in axes]
    assert views["Training task reward (all samples)"] == [(x, ["reward/correct"]) for x in axes]
    assert ("_step", ["kl/value"]) in views["Policy"] and ("_step", ["policy/clipfrac"]) in views["Policy"]
    assert ("_step", ["policy/optimizer_steps_total"]) in views["Budget"]
    runset = spec["spec"]["section"]["runSets"][0]
    # only the sweep group's runs, grouped by job type: the arm (scripts/train.py sets job_type = arm)
    assert [(f["key"]["name"], f["op"], f["value"]) for f in runset["filters"]["filters"]] == [
        ("group", "=", "compare")
    ]
    assert runset["grouping"] == [{"section": "run", "name": "jobType"}]


def test_the_view_can_group_by_algorithm_instead():
    spec = wandb_view.spec(wandb_view.build_workspace("dapo_ablation", entity="me", group_by="algorithm"))
    grouping = spec["spec"]["section"]["runSets"][0]["grouping"]
    assert grouping == [{"section": "config", "name": "algorithm.value.name"}]
    assert spec["displayName"] == "rl-lab dapo_ablation: by algorithm"


def test_dry_run_prints_the_spec_and_saving_needs_a_login(monkeypatch, capsys):
    wandb_view.main(["--group", "compare", "--dry-run"])
    printed = json.loads(capsys.readouterr().out)
    assert panels(printed)["Held-out accuracy"][0] == ("_step", ["eval/accuracy"])
    monkeypatch.setattr("common.logging.wandb_logged_in", lambda: False)
    with pytest.raises(SystemExit, match="^wandb_view: W&B is not logged in"):
        wandb_view.main(["--group", "compare"])
