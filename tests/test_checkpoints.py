"""What a run leaves on disk: step checkpoints go once the final one is written (unless kept), the
newest trainer.keep_last_checkpoints are kept while it runs, a weights-only final checkpoint
(trainer.save_only_model) serves scripts/eval.py but not a resume, and an interrupted run still has
a checkpoint it resumes from; resume=auto skips what a killed save left (a partial folder, a corrupt
checkpoint, a truncated last line of metrics.jsonl) and goes on from the newest checkpoint that reads."""

from __future__ import annotations

import json
import logging
import re
import signal
from pathlib import Path

import pytest
import torch

import common.checkpoint as checkpoint_module
import common.logging as logging_module
import common.run_checkpoints as run_checkpoints_module
import common.trainer as trainer_module
from common.checkpoint import (
    COMPLETE_FILE,
    MODEL_ONLY,
    STATE_FILE,
    fsync_tree,
    prune_checkpoints,
    remove_stale_folders,
    remove_step_checkpoints,
    save_checkpoint,
)
from common.logging import drop_rows_after
from common.state import RunInterruptedError
from scripts.eval import main as eval_main
from scripts.train import run
from tests.conftest import TINY_RUN, compose_train
from tests.test_cli import train_cli
from tests.test_resume import assert_same_run, read_metrics


def checkpoint_names(run_dir: Path) -> list[str]:
    """Every entry of checkpoints/, hidden ones (a temporary folder left behind) included."""
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def read_state(folder: Path) -> dict:
    return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)


@pytest.mark.parametrize("keep, left", [(False, ["final"]), (True, ["final", "step_1", "step_2"])])
def test_finished_run_removes_the_step_checkpoints_unless_kept(tmp_path, cache_dir, caplog, keep, left):
    cfg = compose_train(
        *TINY_RUN,
        "trainer.max_steps=3",
        "trainer.save_every=1",
        "trainer.keep_last_checkpoints=0",  # every step checkpoint stays while the run goes on
        f"trainer.keep_step_checkpoints={str(keep).lower()}",
        f"paths.cache_dir={cache_dir}",
    )
    with caplog.at_level(logging.INFO, logger="rl_lab"):
        run(cfg, tmp_path)
    assert checkpoint_names(tmp_path) == left
    assert "optimizer" in read_state(tmp_path / "checkpoints" / "final")  # resumable by default
    # the closing line reports the run folder's size, as the files under it add up
    reported = re.search(r"takes ([\d.]+) MB on disk", caplog.text)
    assert reported is not None, caplog.text
    on_disk = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file() and p.name != "train.log")
    assert float(reported.group(1)) == pytest.approx(on_disk / 1e6, abs=0.06)


def test_remove_step_checkpoints_keeps_those_after_the_final_step(tmp_path):
    for step in (2, 10, 30):
        (tmp_path / "checkpoints" / f"step_{step}").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_x").mkdir()  # not a step checkpoint: left alone
    remove_step_checkpoints(tmp_path, up_to=10)
    assert checkpoint_names(tmp_path) == ["step_30", "step_x"]


def test_save_only_model_final_serves_eval_but_not_resume(tmp_path, cache_dir):
    overrides = (*TINY_RUN, "trainer.max_steps=2", "trainer.save_every=1", "trainer.save_only_model=true")
    run(compose_train(*overrides, f"paths.cache_dir={cache_dir}"), tmp_path)
    final = tmp_path / "checkpoints" / "final"
    assert checkpoint_names(tmp_path) == ["final"]
    assert read_state(final) == {"step": 2, MODEL_ONLY: True}  # no optimizer, scheduler or RNG state
    # scripts/eval.py finds it in the run directory and loads the trained weights from it
    result = eval_main([str(tmp_path), "--num-prompts", "2", "--k", "1", "--max-new-tokens", "4"])
    assert result["model"] == str(final) and result["metrics"]["errors"] == 0
    # resume from it stops with one line that says why
    result = train_cli(*overrides, f"hydra.run.dir={tmp_path}", "resume=auto", cache_dir=cache_dir)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "weights only" in errors[0] and "save_only_model" in errors[0]
    assert "Traceback" not in result.stderr


def test_interrupted_save_only_model_run_resumes_from_its_step_checkpoint(tmp_path, cache_dir, monkeypatch):
    original = trainer_module.train_step

    def sigterm_at_step_2(ctx, step, *args):
        out = original(ctx, step, *args)
        if step == 2:
            signal.raise_signal(signal.SIGTERM)  # as SLURM before its time limit: finish, checkpoint, stop
        return out

    monkeypatch.setattr(trainer_module, "train_step", sigterm_at_step_2)
    overrides = (
        *TINY_RUN,
        "trainer.max_steps=4",
        "trainer.save_every=0",
        "trainer.save_only_model=true",
        f"paths.cache_dir={cache_dir}",
    )
    with pytest.raises(RunInterruptedError):
        run(compose_train(*overrides), tmp_path)
    assert checkpoint_names(tmp_path) == ["step_2"]
    assert "optimizer" in read_state(tmp_path / "checkpoints" / "step_2")  # the full state, to resume
    monkeypatch.undo()
    run(compose_train(*overrides, "resume=auto"), tmp_path)
    assert checkpoint_names(tmp_path) == ["final"]
    assert read_state(tmp_path / "checkpoints" / "final") == {"step": 4, MODEL_ONLY: True}


def test_pruning_keeps_the_newest_step_checkpoints(tmp_path, cache_dir, monkeypatch):
    seen = []
    original = run_checkpoints_module.prune_checkpoints

    def recording(run_dir, written, keep_last):
        original(run_dir, written, keep_last)
        seen.append(checkpoint_names(run_dir))

    monkeypatch.setattr(run_checkpoints_module, "prune_checkpoints", recording)
    overrides = (*TINY_RUN, "trainer.max_steps=5", "trainer.save_every=1", "trainer.keep_last_checkpoints=2")
    run(
        compose_train(*overrides, "trainer.keep_step_checkpoints=true", f"paths.cache_dir={cache_dir}"),
        tmp_path,
    )
    # saved after steps 1-4 (step 5 is the final one), at most the newest two kept while the run goes on
    assert seen == [
        ["step_1"],
        ["step_1", "step_2"],
        ["step_2", "step_3"],
        ["step_3", "step_4"],
        ["final", "step_3", "step_4"],
    ]
    assert checkpoint_names(tmp_path) == ["final", "step_3", "step_4"]


def test_drop_rows_after_keeps_the_steps_up_to_the_checkpoint_and_drops_a_truncated_line(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    rows = "".join(json.dumps({"step": s, "reward/total": s / 10}) + "\n" for s in range(5))
    path.write_text(rows + '{"step": 5, "reward/to')  # a kill in the middle of writing step 5
    drop_rows_after(path, 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2, 3]
    assert "dropped 1 unreadable line(s) (line 6)" in caplog.text
    drop_rows_after(path, -1)  # resume=auto without a checkpoint: every row goes
    assert path.read_text() == ""
    drop_rows_after(tmp_path / "missing.jsonl", 3)  # no file: nothing to do


def test_stale_folders_go_and_a_replacement_cut_between_its_renames_is_finished(tmp_path):
    folder = tmp_path / "checkpoints"

    def checkpoint(name: str, step: int, complete: bool = True) -> None:
        (folder / name).mkdir(parents=True)
        torch.save({"step": step}, folder / name / STATE_FILE)
        if complete:
            (folder / name / COMPLETE_FILE).write_text(json.dumps({"step": step}))

    # `final` was being replaced: the old copy moved aside, the new one complete but not yet in place
    checkpoint(".final.old-12-34", 4)
    checkpoint(".final.tmp-abc", 6)
    checkpoint(".step_5.tmp-def", 5, complete=False)  # a save killed before its marker
    checkpoint(".step_2.del-56-78", 2)  # a deletion killed half way
    checkpoint("step_3", 3)
    checkpoint(".step_3.tmp-ghi", 3)  # a complete copy of a checkpoint that is in place: redundant
    remove_stale_folders(tmp_path)
    assert checkpoint_names(tmp_path) == ["final", "step_3"]
    assert json.loads((folder / "final" / COMPLETE_FILE).read_text()) == {"step": 6}  # the new one


def test_resume_auto_goes_on_from_the_newest_checkpoint_that_reads(tmp_path, cache_dir, caplog):
    common = (
        *TINY_RUN,
        "trainer.save_every=1",
        "trainer.keep_last_checkpoints=0",
        f"paths.cache_dir={cache_dir}",
    )
    straight, run_dir = tmp_path / "straight", tmp_path / "run"
    run(compose_train(*common, "trainer.max_steps=4"), straight)
    run(compose_train(*common, "trainer.max_steps=3", "trainer.keep_step_checkpoints=true"), run_dir)
    folder = run_dir / "checkpoints"
    assert checkpoint_names(run_dir) == ["final", "step_1", "step_2"]
    # by hand, what kills and a bad disk leave: the newest checkpoint (final, step 3) corrupt, ...
    state = (folder / "final" / STATE_FILE).read_bytes()
    (folder / "final" / STATE_FILE).write_bytes(state[: len(state) // 2])
    # ... a save killed while writing its state, a checkpoint folder without its marker, ...
    (folder / ".step_4.tmp-x1y2").mkdir()
    (folder / ".step_4.tmp-x1y2" / STATE_FILE).write_bytes(state[:1000])
    (folder / "step_9").mkdir()
    (folder / "step_9" / STATE_FILE).write_bytes(state)
    # ... and the last line of metrics.jsonl cut short
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "reward/total": 0.')
    with caplog.at_level(logging.INFO, logger="rl_lab"):
        run(compose_train(*common, "trainer.max_steps=4", "resume=auto"), run_dir)
    assert f"resume: cannot read checkpoint {folder / 'final'}: " in caplog.text
    assert f"{folder / 'step_9'} has no {COMPLETE_FILE}" in caplog.text
    assert f"resuming from {folder / 'step_2'} (step 2)" in caplog.text
    assert "removed 1 temporary folder(s)" in caplog.text
    assert checkpoint_names(run_dir) == ["final", "step_9"]  # step_9 is no checkpoint of this run's: left
    assert sorted(read_metrics(run_dir)) == [1, 2, 3, 4]  # read_metrics: every step exactly once
    assert_same_run(straight, run_dir, [1, 2, 3, 4])


def fake_checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    """A checkpoint folder as far as pruning sees it: a state file and, when complete, the marker."""
    folder.mkdir(parents=True)
    torch.save({"step": step}, folder / STATE_FILE)
    if complete:
        (folder / COMPLETE_FILE).write_text(json.dumps({"step": step}))
    return folder


def test_pruning_deletes_only_complete_checkpoints_older_than_the_one_written(tmp_path):
    """step_20 good, step_30 corrupt (a later run's, abandoned), step_10 without its marker: saving
    step_25 with keep_last_checkpoints=1 deletes step_20 only; =2 would keep it."""
    folder = tmp_path / "checkpoints"
    fake_checkpoint(folder / "step_20", 20)
    fake_checkpoint(folder / "step_30", 30).joinpath(STATE_FILE).write_bytes(b"corrupt")
    fake_checkpoint(folder / "step_10", 10, complete=False)
    written = fake_checkpoint(folder / "step_25", 25)
    prune_checkpoints(tmp_path, written, keep_last=2)
    assert checkpoint_names(tmp_path) == ["step_10", "step_20", "step_25", "step_30"]
    prune_checkpoints(tmp_path, written, keep_last=1)
    assert checkpoint_names(tmp_path) == ["step_10", "step_25", "step_30"]
    prune_checkpoints(tmp_path, fake_checkpoint(folder / "final", 26), keep_last=1)  # final: nothing
    assert checkpoint_names(tmp_path) == ["final", "step_10", "step_25", "step_30"]


def test_save_fsyncs_files_before_the_marker_and_the_folder_after_the_rename(tmp_path, monkeypatch):
    calls = []

    def recording(folder, files=None):
        calls.append((folder, files, (folder / COMPLETE_FILE).exists()))

    monkeypatch.setattr(checkpoint_module, "fsync_tree", recording)
    model = torch.nn.Linear(2, 2)
    model.save_pretrained = lambda folder, state_dict=None: torch.save(model.state_dict(), folder / "w.pt")
    tokenizer = type("Tokenizer", (), {"save_pretrained": lambda self, folder: None})()
    path = save_checkpoint(
        tmp_path / "checkpoints" / "step_1", model=model, tokenizer=tokenizer, state={"step": 1}
    )
    (tmp, all_files, marker_then), (tmp2, marker_only, _), (parent, none, _) = calls
    assert all_files is None and not marker_then  # every file, before the marker exists
    assert tmp2 == tmp and marker_only == [tmp / COMPLETE_FILE]
    assert parent == path.parent and none == []  # the folder holding the renamed checkpoint
    fsync_tree(path)  # the real one runs on a real folder


def test_resume_from_an_older_step_sets_the_newer_checkpoints_aside(tmp_path, cache_dir, caplog):
    common = (
        *TINY_RUN,
        "trainer.save_every=1",
        "trainer.keep_last_checkpoints=0",
        f"paths.cache_dir={cache_dir}",
    )
    run(compose_train(*common, "trainer.max_steps=3", "trainer.keep_step_checkpoints=true"), tmp_path)
    step_1 = tmp_path / "checkpoints" / "step_1"
    with caplog.at_level(logging.INFO, logger="rl_lab"):
        run(compose_train(*common, "trainer.max_steps=2", f"resume={step_1}"), tmp_path)
    assert "resumed from step 1: the later checkpoints final, step_2 moved to" in caplog.text
    (aside,) = (tmp_path / "checkpoints_set_aside").iterdir()
    assert sorted(p.name for p in aside.iterdir()) == ["final", "step_2"]
    assert read_state(tmp_path / "checkpoints" / "final")["step"] == 2  # this run's, not the old step 3
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rl_lab"):  # resume=auto goes on from this run's end
        run(compose_train(*common, "trainer.max_steps=3", "resume=auto"), tmp_path)
    assert f"resuming from {tmp_path / 'checkpoints' / 'final'} (step 2)" in caplog.text
    assert sorted(read_metrics(tmp_path)) == [1, 2, 3]


def test_trimming_a_log_replaces_it_whole(tmp_path, monkeypatch):
    """The trimmed rows go to a new file renamed over the log: a kill before the rename (here, the
    rename failing) leaves the old file, never an empty or half-written one."""
    path = tmp_path / "samples.jsonl"
    rows = "".join(json.dumps({"step": s}) + "\n" for s in range(1, 5))
    path.write_text(rows)

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(logging_module.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        drop_rows_after(path, 2)
    assert path.read_text() == rows
    monkeypatch.undo()
    drop_rows_after(path, 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
