"""scripts/compare.py on synthetic run directories: loading, aggregation, the table and the figure.

The sweep built here (threshold 0.6, evaluations at steps 0, 5, 10 and the last step):

    run      steps  finished  eval/accuracy at 0 / 5 / 10 (/ 12)  tokens/step  s/step  kl/value
    ppo  s0  10     yes       0.2 / 0.4 / 0.5                      100          30      0.001 * step
    ppo  s1  10     yes       0.4 / 0.6 / 0.7                      100          50      0.001 * step
    grpo s0  10     yes       0.3 / 0.6 / 0.8                      200          40      0.002 * step
    grpo s1  7      no        0.3 / 0.5        (step 8 truncated)   200          40      0.002 * step
    dapo s0  12     yes       0.3 / 0.7 / 0.9 / 0.9                150          20      -
    dapo s1  10     yes       0.3 / 0.5 / 0.8                      150          20      -
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from omegaconf import OmegaConf

from scripts import compare
from scripts.comparison import curves
from scripts.comparison.curves import aggregate
from scripts.comparison.figure import plot
from scripts.comparison.runs import Run, find_runs, group_runs, load_run
from scripts.comparison.tables import summary_table
from tests.conftest import ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(
    root: Path,
    algorithm: str,
    seed: int,
    *,
    steps: int,
    accuracy: dict[int, float],
    tokens_per_step: int,
    step_s: float,
    kl_per_step: float | None,
    group_size: int = 8,
    finished: bool = True,
    truncated_step: int | None = None,
    nan_reward_step: int | None = None,
    max_steps: int = 10,
) -> Path:
    """A run directory as scripts.train writes it; reward/correct = 0.1 + 0.01 * seed + 0.05 * step.
    `steps` rows are written; the config's trainer.max_steps is `max_steps`, the same for every run
    of a sweep (runs of one arm that differ in it are not pooled)."""
    run_dir = root / "multirun" / "2026-01-01_00-00-00" / f"{algorithm}-addition-s{seed}-G{group_size}"
    (run_dir / ".hydra").mkdir(parents=True)
    config = {
        "experiment_name": "compare_test",
        "seed": seed,
        # an interpolation, as in configs/algorithm/grpo.yaml: load_run must resolve it
        "algorithm": {"name": algorithm, "group_size": "${rollout.group_size}"},
        "rollout": {"group_size": group_size},
        "task": {"name": "addition"},
        "model": {"name": "tiny"},
        "trainer": {"max_steps": max_steps, "eval_every": 5},
    }
    OmegaConf.save(OmegaConf.create(config), run_dir / ".hydra" / "config.yaml")
    rows = [{"step": 0, "eval/accuracy": accuracy[0], "eval/reward": accuracy[0], "perf/eval_s": 1.0}]
    for step in range(1, steps + 1):
        row = {
            "step": step,
            "reward/correct": "nan" if step == nan_reward_step else 0.1 + 0.01 * seed + 0.05 * step,
            "reward/total": 0.1,
            "policy/loss": "nan" if step == 1 else 0.01,
            "sampling/samples_total": 16 * step,
            "sampling/tokens_total": tokens_per_step * step,
            "policy/optimizer_steps_total": 4 * step,
            "perf/step_s": step_s,
            "perf/wall_s": step_s * step,
        }
        if kl_per_step is not None:
            row["kl/value"] = kl_per_step * step
        if step in accuracy:
            row.update({"eval/accuracy": accuracy[step], "eval/reward": accuracy[step], "perf/eval_s": 1.0})
        rows.append(row)
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if truncated_step is not None:
        text += json.dumps({"step": truncated_step, "reward/correct": 0.5})[:25]  # killed mid-write
    (run_dir / "metrics.jsonl").write_text(text)
    if finished:
        (run_dir / "checkpoints" / "final").mkdir(parents=True)
    return run_dir


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """The six runs of the module docstring under tmp_path/sweep."""
    root = tmp_path / "sweep"
    common = {"steps": 10}
    write_run(root, "ppo", 0, **common, accuracy={0: 0.2, 5: 0.4, 10: 0.5}, tokens_per_step=100,
              step_s=30, kl_per_step=0.001, nan_reward_step=3)  # fmt: skip
    write_run(root, "ppo", 1, **common, accuracy={0: 0.4, 5: 0.6, 10: 0.7}, tokens_per_step=100,
              step_s=50, kl_per_step=0.001)  # fmt: skip
    write_run(root, "grpo", 0, **common, accuracy={0: 0.3, 5: 0.6, 10: 0.8}, tokens_per_step=200,
              step_s=40, kl_per_step=0.002)  # fmt: skip
    write_run(root, "grpo", 1, steps=7, accuracy={0: 0.3, 5: 0.5}, tokens_per_step=200, step_s=40,
              kl_per_step=0.002, finished=False, truncated_step=8)  # fmt: skip
    write_run(root, "dapo", 0, steps=12, accuracy={0: 0.3, 5: 0.7, 10: 0.9, 12: 0.9}, tokens_per_step=150,
              step_s=20, kl_per_step=None)  # fmt: skip
    write_run(root, "dapo", 1, **common, accuracy={0: 0.3, 5: 0.5, 10: 0.8}, tokens_per_step=150,
              step_s=20, kl_per_step=None)  # fmt: skip
    return root


def table_after(markdown: str, heading: str | None = None) -> list[list[str]]:
    """The cells of the first Markdown table after the line `heading` (None: the first table),
    header row first, the |---| line left out."""
    lines = markdown.splitlines()
    start = 0 if heading is None else lines.index(heading)
    first = next(i for i in range(start, len(lines)) if lines[i].startswith("| "))
    end = next((i for i in range(first, len(lines)) if not lines[i].startswith("|")), len(lines))
    return [
        [cell.strip() for cell in line.strip("|").split(" | ")]
        for line in lines[first:end]
        if not line.startswith("|---")
    ]


def table_rows(markdown: str) -> dict[str, list[str]]:
    """The first Markdown table's rows by their first cell (the label)."""
    return {cells[0]: cells[1:] for cells in table_after(markdown)[1:]}


def statistics_rows(markdown: str, heading: str) -> dict[tuple[str, str], list[str]]:
    """The rows of the table under `heading` by their first two cells: (label, metric) or (X, Y)."""
    _, *rows = table_after(markdown, heading)
    return {(cells[0], cells[1]): cells[2:] for cells in rows}


def by_algorithm(runs: list[Run], algorithm: str) -> list[Run]:
    return sorted((run for run in runs if run.algorithm == algorithm), key=lambda run: run.seed)


# --- loading ---------------------------------------------------------------------------------------


def test_load_run_reads_config_rows_and_nonfinite_strings(sweep):
    run = by_algorithm(find_runs([sweep]), "ppo")[0]
    assert (run.algorithm, run.label, run.seed, run.finished, run.warnings) == ("ppo", "ppo", 0, True, [])
    assert run.config["algorithm"]["group_size"] == 8  # the interpolation was resolved
    assert [row["step"] for row in run.rows] == list(range(11))
    assert np.isnan(run.rows[1]["policy/loss"]) and np.isnan(run.rows[3]["reward/correct"])


def test_truncated_last_line_is_skipped_with_a_warning(sweep):
    crashed = next(p for p in sweep.rglob("grpo-addition-s1-*") if p.is_dir())
    run = load_run(crashed)
    assert not run.finished
    assert run.rows[-1]["step"] == 7
    assert len(run.warnings) == 1 and "last line" in run.warnings[0] and "truncated" in run.warnings[0]


def test_find_runs_recurses_and_labels_by_algorithm(sweep, tmp_path):
    runs = find_runs([sweep, sweep / "multirun"])  # overlapping paths: each run once
    assert len(runs) == 6
    assert sorted(run.label for run in runs) == ["dapo", "dapo", "grpo", "grpo", "ppo", "ppo"]
    # a run directory itself is a valid PATH
    assert len(find_runs([next(sweep.rglob("ppo-addition-s0-*"))])) == 1


def test_group_sizes_that_differ_within_an_algorithm_split_the_label(tmp_path):
    for group_size in (4, 16):
        write_run(tmp_path, "grpo", 0, steps=2, accuracy={0: 0.1}, tokens_per_step=10, step_s=1,
                  kl_per_step=None, group_size=group_size)  # fmt: skip
    write_run(tmp_path, "dapo", 0, steps=2, accuracy={0: 0.1}, tokens_per_step=10, step_s=1, kl_per_step=None)
    labels = sorted(run.label for run in find_runs([tmp_path]))
    assert labels == ["dapo", "grpo-G16", "grpo-G4"]
    assert list(group_runs(find_runs([tmp_path]))) == ["grpo-G4", "grpo-G16", "dapo"]


def test_missing_path_and_empty_folder_exit_with_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"compare: .*nope does not exist"):
        find_runs([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"compare: no runs under .*empty"):
        find_runs([tmp_path / "empty"])


# --- aggregation -----------------------------------------------------------------------------------


def make_run(rows: list[dict], seed: int = 0) -> Run:
    return Run(
        path=f"run{seed}",
        algorithm="grpo",
        arm="grpo",
        label="grpo",
        seed=seed,
        config={},
        rows=rows,
        finished=True,
    )


def test_aggregate_by_step_uses_the_union_of_steps(sweep):
    grpo = by_algorithm(find_runs([sweep]), "grpo")
    x, mean, std, n = aggregate(grpo, "eval/accuracy", "step")
    # step 0: (0.3, 0.3); step 5: (0.6, 0.5) -> 0.55, sample std 0.1 / sqrt(2) = 0.0707; step 10: s0 only
    np.testing.assert_allclose(x, [0, 5, 10])
    np.testing.assert_allclose(mean, [0.3, 0.55, 0.8])
    np.testing.assert_allclose(std, [0.0, 0.1 / np.sqrt(2), 0.0], atol=1e-12)
    np.testing.assert_array_equal(n, [2, 2, 1])
    x, mean, _, n = aggregate(grpo, "reward/correct", "step")
    np.testing.assert_allclose(x, np.arange(1, 11))
    np.testing.assert_array_equal(n, [2] * 7 + [1] * 3)  # the crashed seed stops at step 7
    # step 1: (0.15, 0.16) -> 0.155
    assert mean[0] == pytest.approx(0.155)


def test_aggregate_skips_nonfinite_values(sweep):
    ppo = by_algorithm(find_runs([sweep]), "ppo")
    x, mean, _, n = aggregate(ppo, "reward/correct", "step")
    assert n[list(x).index(3)] == 1  # seed 0 logged "nan" at step 3
    assert mean[list(x).index(3)] == pytest.approx(0.1 + 0.01 + 0.15)


def runs_by_tokens() -> list[Run]:
    """seed 0 at tokens (0, 100, 200, 300): 0.1, 0.3, 0.5, 0.9; seed 1 at tokens (0, 200): 0.1, 0.7.
    Step 0 has no tokens_total: it counts as 0 tokens."""
    seed0 = make_run(
        [{"step": 0, "eval/accuracy": 0.1}]
        + [
            {"step": s, "sampling/tokens_total": 100 * s, "eval/accuracy": a}
            for s, a in [(1, 0.3), (2, 0.5), (3, 0.9)]
        ]
    )
    seed1 = make_run(
        [{"step": 0, "eval/accuracy": 0.1}, {"step": 1, "sampling/tokens_total": 200, "eval/accuracy": 0.7}],
        1,
    )
    return [seed0, seed1]


def test_aggregate_interpolates_within_each_run_only():
    x, mean, std, n = aggregate(runs_by_tokens(), "eval/accuracy", "sampling/tokens_total")
    # seed 1 at 100 tokens = 0.4 (interpolated); at 300 tokens it has no value (no extrapolation)
    np.testing.assert_allclose(x, [0, 100, 200, 300])
    np.testing.assert_allclose(mean, [0.1, 0.35, 0.6, 0.9])
    np.testing.assert_allclose(std, [0.0, 0.05 * np.sqrt(2), 0.1 * np.sqrt(2), 0.0], atol=1e-12)
    np.testing.assert_array_equal(n, [2, 2, 2, 1])


def test_aggregate_of_a_missing_key_is_empty(sweep):
    x, mean, std, n = aggregate(by_algorithm(find_runs([sweep]), "dapo"), "kl/value", "step")
    assert len(x) == len(mean) == len(std) == len(n) == 0
    x, iqm, low, high, n = curves.aggregate_iqm(
        by_algorithm(find_runs([sweep]), "dapo"), "kl/value", "step", reps=10, seed=0
    )
    assert len(x) == len(iqm) == len(low) == len(high) == len(n) == 0


def test_aggregate_iqm_by_tokens_bands_the_runs_present():
    # runs_by_tokens on the token grid (0, 100, 200, 300): seed 0 (0.1, 0.3, 0.5, 0.9), seed 1
    # (0.1, 0.4, 0.7, -). Two runs: IQM = mean, band = [min, max]; one run: a point
    x, iqm, low, high, n = curves.aggregate_iqm(
        runs_by_tokens(), "eval/accuracy", "sampling/tokens_total", reps=10_000, seed=0
    )
    np.testing.assert_allclose(x, [0, 100, 200, 300])
    np.testing.assert_allclose(iqm, [0.1, 0.35, 0.6, 0.9])
    np.testing.assert_allclose(low, [0.1, 0.3, 0.5, 0.9])
    np.testing.assert_allclose(high, [0.1, 0.4, 0.7, 0.9])
    np.testing.assert_array_equal(n, [2, 2, 2, 1])


# --- table -----------------------------------------------------------------------------------------


def test_summary_table_hand_computed(sweep):
    markdown = summary_table(find_runs([sweep]), threshold=0.6)
    rows = table_rows(markdown)
    assert list(rows) == ["ppo", "grpo", "dapo"]
    assert "sample std (ddof=1)" in markdown
    # runs, final acc, best acc, start acc, steps to 0.6, tokens to 0.6, s/step, final KL, tokens,
    # policy updates (4 per step)
    # ppo: final (0.5, 0.7) -> 0.600 ± 0.2 / sqrt(2) = 0.141; start (0.2, 0.4) -> 0.300 ± 0.141;
    # only seed 1 reaches 0.6, at step 5 = 500 tokens; s/step (30, 50) -> 40.0 ± 14.1; KL 0.01 each;
    # 10 steps each -> 40 ± 0 updates
    assert rows["ppo"] == [
        "2/2",
        "0.600 ± 0.141",
        "0.600 ± 0.141",
        "0.300 ± 0.141",
        "5.0 (1/2)",
        "500 (1/2)",
        "40.0 ± 14.1",
        "0.0100 ± 0.0000",
        "1.0k ± 0",
        "40 ± 0",
    ]
    # grpo: the crashed seed's last evaluation (0.5) is its final: (0.8, 0.5) -> 0.650 ± 0.212;
    # tokens (2000, 1400) -> 1.7k ± 424; updates (40, 28) -> 34 ± 8.49
    assert rows["grpo"] == [
        "1/2",
        "0.650 ± 0.212",
        "0.650 ± 0.212",
        "0.300 ± 0.000",
        "5.0 (1/2)",
        "1.0k (1/2)",
        "40.0 ± 0.0",
        "0.0170 ± 0.0042",
        "1.7k ± 424",
        "34 ± 8",
    ]
    # dapo: final (0.9, 0.8); best (0.9, 0.8); reaches 0.6 at steps (5, 10) -> 7.5 ± 3.5 = tokens
    # (750, 1500) -> 1.1k ± 530; no KL term; updates (48, 40) -> 44 ± 5.66
    assert rows["dapo"] == [
        "2/2",
        "0.850 ± 0.071",
        "0.850 ± 0.071",
        "0.300 ± 0.000",
        "7.5 ± 3.5 (2/2)",
        "1.1k ± 530 (2/2)",
        "20.0 ± 0.0",
        "—",
        "1.6k ± 212",
        "44 ± 6",
    ]
    crashed = [line for line in markdown.splitlines() if "no final checkpoint" in line]
    assert len(crashed) == 1 and "grpo-addition-s1" in crashed[0] and crashed[0].endswith("used steps 1..7")
    assert "truncated" in markdown


def test_iqm_and_probability_of_improvement_sections_hand_computed(sweep):
    markdown = summary_table(find_runs([sweep]), threshold=0.6)
    iqm = statistics_rows(markdown, "## Interquartile mean")
    assert table_after(markdown, "## Interquartile mean")[0] == [
        "arm", "held-out acc", "runs", "IQM", "95% CI", "mean ± std"
    ]  # fmt: skip
    # 2 runs: the IQM is their mean; a resample of 2 runs is (a, a), (a, b) or (b, b), and (a, a) and
    # (b, b) each have chance 1/4 > 2.5%, so the 95% interval is [min, max]
    assert iqm[("ppo", "final")] == ["2", "0.600", "[0.500, 0.700]", "0.600 ± 0.141"]
    # the crashed grpo seed counts with its last evaluation (0.5 at step 5); best = final for both
    assert iqm[("grpo", "final")] == ["2 (1 unfinished)", "0.650", "[0.500, 0.800]", "0.650 ± 0.212"]
    assert iqm[("grpo", "best")] == iqm[("grpo", "final")]
    assert iqm[("dapo", "best")] == ["2", "0.850", "[0.800, 0.900]", "0.850 ± 0.071"]
    assert len(iqm) == 6
    better = statistics_rows(markdown, "## Probability of improvement")
    # final accuracies ppo (0.5, 0.7), grpo (0.8, 0.5), dapo (0.9, 0.8)
    # ppo > grpo: 0.5 vs (0.8, 0.5): 0 + 1/2; 0.7 vs (0.8, 0.5): 0 + 1 -> 1.5 / 4. A resample
    # ppo (0.5, 0.5) with grpo (0.8, 0.8) gives 0, ppo (0.7, 0.7) with grpo (0.5, 0.5) gives 1: each 1/16
    assert better[("ppo", "grpo")] == ["2, 2", "0.375", "[0.000, 1.000]"]
    assert better[("ppo", "dapo")] == ["2, 2", "0.000", "[0.000, 0.000]"]  # every ppo run is below
    # grpo > dapo: only 0.8 = 0.8 ties -> 0.5 / 4; at best grpo (0.8, 0.8) vs dapo (0.8, 0.8) -> 0.5
    assert better[("grpo", "dapo")] == ["2, 2", "0.125", "[0.000, 0.500]"]
    assert len(better) == 3


def test_iqm_trims_an_outlier_run_that_the_mean_keeps():
    # five seeds, final accuracy 0.0 (crashed at step 1), 0.5, 0.6, 0.6, 0.7: IQM drops one run at each
    # end -> (0.5 + 0.6 + 0.6) / 3 = 0.567; the mean is 2.4 / 5 = 0.480
    runs = [
        make_run([{"step": 0, "eval/accuracy": 0.3}, {"step": 10, "eval/accuracy": final}], seed)
        for seed, final in enumerate([0.5, 0.6, 0.0, 0.6, 0.7])
    ]
    runs[2].finished = False
    markdown = summary_table(runs, threshold=0.6)
    runs_cell, iqm, _, mean_std = statistics_rows(markdown, "## Interquartile mean")[("grpo", "final")]
    assert (runs_cell, iqm) == ("5 (1 unfinished)", "0.567")
    assert mean_std.startswith("0.480 ± ")
    # one algorithm: no pair to compare
    assert statistics_rows(markdown, "## Probability of improvement") == {("—", "—"): ["—", "—", "—"]}


def test_threshold_never_reached_is_na(sweep):
    rows = table_rows(summary_table(find_runs([sweep]), threshold=0.95))
    assert rows["dapo"][4:6] == ["n/a (0/2)", "n/a (0/2)"]


# --- figure and command line -----------------------------------------------------------------------


def test_plot_writes_a_png(sweep, tmp_path):
    path = plot(find_runs([sweep]), tmp_path / "figs" / "comparison.png", threshold=0.6)
    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width, channels = matplotlib.image.imread(path).shape
    assert width > height > 500 and channels in (3, 4)


def test_main_writes_both_files_and_prints_the_table(sweep, capsys):
    compare.main([str(sweep), "--threshold", "0.6"])
    out = capsys.readouterr()
    png, md = sweep / "comparison.png", sweep / "comparison.md"
    assert png.read_bytes()[:8] == PNG_MAGIC and matplotlib.image.imread(png).ndim == 3
    assert "| ppo |" in md.read_text() and "| ppo |" in out.out
    assert f"wrote {png}" in out.out and f"wrote {md}" in out.out
    assert "truncated" in out.err
    for section in ("## Interquartile mean", "## Probability of improvement"):
        assert section in md.read_text() and section in out.out


def test_main_bootstrap_flags(sweep, capsys):
    compare.main([str(sweep), "--bootstrap-reps", "200", "--seed", "7"])
    assert "200 resamples of the runs, seed 7" in (sweep / "comparison.md").read_text()
    with pytest.raises(SystemExit):
        compare.main([str(sweep), "--bootstrap-reps", "0"])
    assert "--bootstrap-reps must be at least 1 (got 0)" in capsys.readouterr().err


def test_cli_missing_path_is_one_line_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "scripts.compare", str(tmp_path / "nope")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == f"compare: {tmp_path / 'nope'} does not exist"


# --- W&B (a fake wandb module: never the network) ------------------------------------------------


class FakeWandbRun:
    def __init__(self, algorithm: str, seed: int, state: str = "finished") -> None:
        self.config = {"algorithm": {"name": algorithm}, "seed": seed, "rollout": {"group_size": 8}}
        self.state = state
        self.path = ["me", "rl-lab", f"{algorithm}{seed}"]

    def scan_history(self):
        yield {"_step": 0, "_runtime": 3.0, "eval/accuracy": 0.2 + 0.1 * self.config["seed"]}
        yield {
            "_step": 1,
            "reward/correct": 0.3,
            "sampling/tokens_total": 50,
            "perf/wall_s": 10.0,
            "kl/value": None,
        }
        yield {"_step": 2, "reward/correct": "NaN", "sampling/tokens_total": 100, "perf/wall_s": 20.0}
        yield {"_step": 2, "eval/accuracy": 0.7}


def fake_wandb(runs=None, error: Exception | None = None) -> types.SimpleNamespace:
    class Api:
        default_entity = "me"

        def runs(self, path, filters):
            if error is not None:
                raise error
            assert path == "me/rl-lab" and filters == {"group": "sweep"}
            return runs

    return types.SimpleNamespace(Api=Api)


def test_wandb_group_is_converted_into_runs(monkeypatch, tmp_path, capsys):
    runs = [FakeWandbRun("grpo", 0), FakeWandbRun("grpo", 1, state="crashed"), FakeWandbRun("dapo", 0)]
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(runs))
    monkeypatch.setattr("common.logging.wandb_logged_in", lambda: True)
    compare.main(["--wandb-group", "sweep", "--out", str(tmp_path)])
    rows = table_rows((tmp_path / "comparison.md").read_text())
    assert rows["grpo"][:3] == ["1/2", "0.700 ± 0.000", "0.700 ± 0.000"]
    assert "wandb:me/rl-lab/grpo1: no final checkpoint; used steps 1..2" in capsys.readouterr().out
    assert (tmp_path / "comparison.png").read_bytes()[:8] == PNG_MAGIC


def test_wandb_not_logged_in_or_offline_exits_with_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb([]))
    monkeypatch.setattr("common.logging.wandb_logged_in", lambda: False)
    with pytest.raises(SystemExit, match="W&B is not logged in"):
        compare.main(["--wandb-group", "sweep"])
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(error=ConnectionError("no network")))
    monkeypatch.setattr("common.logging.wandb_logged_in", lambda: True)
    with pytest.raises(SystemExit, match=r"could not read W&B group 'sweep' \(offline\? ConnectionError"):
        compare.main(["--wandb-group", "sweep"])


# --- arms ------------------------------------------------------------------------------------------


def test_runs_are_grouped_by_arm_and_ordered_with_the_ladder_rung_by_rung(tmp_path):
    # two arms of the same algorithm stay apart; runs without an arm key group by algorithm
    for arm, seed in [("grpo", 0), ("drgrpo", 0), ("drgrpo", 1), ("dapo10_x", 0), ("dapo2_x", 0)]:
        run_dir = write_run(tmp_path, "grpo", seed, steps=2, accuracy={0: 0.1, 2: 0.2}, tokens_per_step=10,
                            step_s=1, kl_per_step=None)  # fmt: skip
        config = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        if arm != "grpo":
            config.arm = arm
        OmegaConf.save(config, run_dir / ".hydra" / "config.yaml")
        run_dir.rename(run_dir.with_name(f"{arm}-{seed}"))
    groups = group_runs(find_runs([tmp_path]))
    # ARM_ORDER first (grpo, drgrpo), then natural order: dapo2 before dapo10
    assert list(groups) == ["grpo", "drgrpo", "dapo2_x", "dapo10_x"]
    assert [run.seed for run in groups["drgrpo"]] == [0, 1]
    assert {run.algorithm for runs in groups.values() for run in runs} == {"grpo"}


def test_probability_of_improvement_is_a_matrix_beyond_three_arms(sweep):
    # a fourth arm, "zz", whose final accuracies (1.0, 1.0) are above every other run
    for seed in (0, 1):
        run_dir = write_run(sweep, "zz", seed, steps=10, accuracy={0: 0.3, 10: 1.0}, tokens_per_step=1,
                            step_s=1, kl_per_step=None)  # fmt: skip
        run_dir.rename(run_dir.with_name(f"zz-{seed}"))
    markdown = summary_table(find_runs([sweep]), threshold=0.6)
    header, *rows = table_after(markdown, "## Probability of improvement")
    assert header == ["P(row > column)", "ppo", "grpo", "dapo", "zz"]
    cells = {row[0]: row[1:] for row in rows}
    # the pairs of the 3-arm list above, and their mirrors: P(grpo > ppo) = 1 - 0.375 = 0.625,
    # interval [1 - 1, 1 - 0] = [0, 1]; nobody beats zz, zz beats everybody
    assert cells["ppo (2 runs)"] == ["—", "0.38 [0.00, 1.00]", "0.00 [0.00, 0.00]", "0.00 [0.00, 0.00]"]
    assert cells["grpo (2 runs)"][0] == "0.62 [0.00, 1.00]"
    assert cells["dapo (2 runs)"][1] == "0.88 [0.50, 1.00]"
    assert cells["zz (2 runs)"] == ["1.00 [1.00, 1.00]"] * 3 + ["—"]


def test_many_arms_get_distinct_colours():
    from scripts.comparison.figure import label_colours

    labels = ["ppo", "grpo", "dapo", *(f"arm{i}" for i in range(20))]
    colours = label_colours(labels)
    assert colours["ppo"] == "tab:blue" and len(set(colours.values())) == len(labels)
