"""The published numbers rest on the results archive: every table line quoted in README.md or docs/*.md
inside an `<!-- archive: PATH ARGS -->` ... `<!-- /archive -->` block is what `python -m scripts.compare
PATH ARGS` gives from docs/results/ today, and each archived experiment's comparison.md is that
command's output. Text and data cannot drift apart."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from scripts import compare
from scripts.comparison.runs import find_runs
from scripts.comparison.tables import summary_table
from tests.conftest import ROOT

BLOCK = re.compile(r"<!-- archive: (?P<args>[^>]*?) -->\n(?P<body>.*?)<!-- /archive -->", re.DOTALL)
RESULTS = ROOT / "docs" / "results"


def regenerated(args: str) -> str:
    """summary_table of the archive folder and options named in a block's marker, as compare.main makes it."""
    parsed = compare.parse_args(shlex.split(args))
    return summary_table(
        find_runs(parsed.paths), parsed.threshold, reps=parsed.bootstrap_reps, seed=parsed.seed
    )


def stale_lines(text: str, root: Path = ROOT) -> list[str]:
    """The table lines of every archive block in `text` that the archive does not give (empty: in sync)."""
    stale = []
    for block in BLOCK.finditer(text):
        args = block["args"].replace("docs/results", str(root / "docs" / "results"), 1)
        fresh = regenerated(args).splitlines()
        stale += [line for line in block["body"].splitlines() if line.startswith("|") and line not in fresh]
    return stale


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("path", documents(), ids=lambda p: p.name)
def test_quoted_tables_equal_what_the_archive_gives(path):
    assert stale_lines(path.read_text(encoding="utf-8")) == []


def test_the_published_experiments_are_quoted_and_their_comparison_md_is_current():
    quoted = {
        shlex.split(block["args"])[0]
        for path in documents()
        for block in BLOCK.finditer(path.read_text(encoding="utf-8"))
    }
    experiments = sorted(p for p in RESULTS.iterdir() if p.is_dir()) if RESULTS.is_dir() else []
    for experiment in experiments:
        name = f"docs/results/{experiment.name}"
        assert name in quoted, f"{name} is archived but no document quotes it"
        args = next(
            block["args"]
            for path in documents()
            for block in BLOCK.finditer(path.read_text(encoding="utf-8"))
            if shlex.split(block["args"])[0] == name
        )
        written = (experiment / "comparison.md").read_text(encoding="utf-8")
        assert written == regenerated(args.replace("docs/results", str(RESULTS), 1)), f"{name}/comparison.md"


def test_a_changed_number_is_caught(tmp_path):
    # an archive of two synthetic runs, a document quoting its table, then one digit changed
    from tests.test_compare import write_run

    archive = tmp_path / "docs" / "results" / "toy"
    for seed in (0, 1):
        write_run(archive, "grpo", seed, steps=2, accuracy={0: 0.2, 2: 0.4 + 0.1 * seed}, tokens_per_step=10,
                  step_s=1, kl_per_step=None)  # fmt: skip
    table = regenerated(f"{archive} --threshold 0.5 --bootstrap-reps 100")
    quoted = [line for line in table.splitlines() if line.startswith("| grpo")]
    text = "<!-- archive: docs/results/toy --threshold 0.5 --bootstrap-reps 100 -->\n" + "\n".join(quoted)
    text += "\n<!-- /archive -->\n"
    assert stale_lines(text, root=tmp_path) == []
    changed = text.replace("0.450", "0.460", 1)
    assert changed != text and stale_lines(changed, root=tmp_path) == [quoted[0].replace("0.450", "0.460", 1)]
