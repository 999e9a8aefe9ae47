"""scripts/archive.py: finished runs into the results archive, which scripts/compare.py reads alike."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from scripts import archive
from scripts.comparison.runs import find_runs
from scripts.comparison.tables import summary_table
from tests.test_compare import write_run


@pytest.fixture
def runs(tmp_path):
    """Two finished runs of arm drgrpo and an unfinished grpo run, as scripts.train leaves them."""
    root = tmp_path / "sweep"
    for algorithm, seed, finished in [("grpo", 0, True), ("grpo", 1, True), ("grpo", 2, False)]:
        run_dir = write_run(root, algorithm, seed, steps=4, accuracy={0: 0.2, 4: 0.3 + 0.1 * seed},
                            tokens_per_step=50, step_s=2, kl_per_step=0.01, finished=finished)  # fmt: skip
        config = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        config.arm = "drgrpo" if finished else "grpo"
        OmegaConf.save(config, run_dir / ".hydra" / "config.yaml")
        (run_dir / ".hydra" / "overrides.yaml").write_text(f"- arm={config.arm}\n- seed={seed}\n")
        (run_dir / "provenance.json").write_text(json.dumps({"starts": [{"commit": "abc"}]}))
        (run_dir / "checkpoints" / "step_2").mkdir(parents=True)  # heavy: never archived
    return root


def test_finished_runs_are_archived_light_and_compare_reads_them_alike(runs, tmp_path):
    to = tmp_path / "results" / "compare"
    outcome = archive.archive([runs], to)
    assert outcome["archived"] == ["drgrpo-s0", "drgrpo-s1"] and len(outcome["unfinished"]) == 1
    run = to / "drgrpo-s1"
    assert sorted(p.name for p in run.iterdir()) == [
        "archive.json", "config.yaml", "metrics.jsonl", "overrides.yaml", "provenance.json"
    ]  # fmt: skip
    assert json.loads((run / "archive.json").read_text())["finished"] is True
    # the archived config is resolved: algorithm.group_size was ${rollout.group_size}
    assert OmegaConf.load(run / "config.yaml").algorithm.group_size == 8
    # the same table from the run folders (finished ones) and from the archive
    from_runs = [r for r in find_runs([runs]) if r.finished]
    assert summary_table(find_runs([to]), 0.5, reps=200) == summary_table(from_runs, 0.5, reps=200)


def test_an_archived_run_is_kept_unless_replaced_and_unfinished_ones_on_request(runs, tmp_path):
    to = tmp_path / "results"
    archive.archive([runs], to)
    (to / "drgrpo-s0" / "metrics.jsonl").write_text("")  # would be lost by a silent overwrite
    again = archive.archive([runs], to, include_unfinished=True)
    assert again == {"archived": ["grpo-s2"], "kept": ["drgrpo-s0", "drgrpo-s1"], "unfinished": []}
    assert (to / "drgrpo-s0" / "metrics.jsonl").read_text() == ""
    assert json.loads((to / "grpo-s2" / "archive.json").read_text())["finished"] is False
    archive.archive([runs], to, replace=True)
    assert (to / "drgrpo-s0" / "metrics.jsonl").read_text() != ""


def test_the_command_line_reports_what_it_did(runs, tmp_path, capsys):
    archive.main([str(runs), "--to", str(tmp_path / "a")])
    out, err = capsys.readouterr()
    assert "archived into" in out and "drgrpo-s0, drgrpo-s1" in out and "skipped (no final checkpoint" in err
