"""Regenerate every published number from the results archive, in one command:

    python -m scripts.refresh_results            # rewrite the quoted tables, comparison.md and .png
    python -m scripts.refresh_results --check    # only say what is stale (exit status 1 if anything)

A document (README.md, docs/*.md) quotes a table of an archived experiment inside a block

    <!-- archive: docs/results/compare --threshold 0.5 : iqm -->
    | arm | held-out acc | runs | IQM | 95% CI | mean ± std |
    ...
    <!-- /archive -->

whose marker holds `scripts.compare`'s arguments (the archive folder first), a colon, and the section
of its Markdown to quote: `summary` (one row per arm), `iqm` (interquartile means with 95% CIs),
`improvement` (probabilities of improvement), `significance` (every pair's permutation test, Holm's
correction and power) or `curves` (areas under the curves and the saturating fits), each with the
notes under its table. This rewrites each block's body with that section as
`python -m scripts.compare` makes it from the archive today, and each quoted experiment's
`comparison.md` and `comparison.png` in its archive folder (with the arguments of its first block).
A block `<!-- prose: <compare arguments> : <kind> -->` ... `<!-- /prose -->` holds sentences made
from the same runs (scripts/comparison/prose.py: pairs, verdict, machines, run, seeds, budget, truncation,
critic, skipped), rewritten the same way. tests/test_results.py runs the check, so text and data
cannot drift apart.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from scripts import compare
from scripts.comparison.figure import plot
from scripts.comparison.prose import prose
from scripts.comparison.runs import find_runs
from scripts.comparison.tables import summary_table

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(
    r"(<!-- archive: (?P<args>[^:>]*?) : (?P<section>\w+) -->\n)(?P<body>.*?)(<!-- /archive -->)", re.DOTALL
)
PROSE_BLOCK = re.compile(
    r"(<!-- prose: (?P<args>[^:>]*?) : (?P<kind>\w+) -->\n)(?P<body>.*?)(<!-- /prose -->)", re.DOTALL
)
# the heading that starts each quotable section of summary_table's Markdown; None: the first table
SECTIONS = {
    "summary": None,
    "iqm": "## Interquartile mean",
    "improvement": "## Probability of improvement",
    "significance": "## Significance and power",
    "curves": "## Curves",
}
# a paragraph right after a section's table that starts so is the table's notes, quoted with it
NOTE = "Note: "


def documents(root: Path = ROOT) -> list[Path]:
    """The files that may quote the archive: README.md and docs/*.md."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """Run the block in `path`, so run paths in the tables stay relative (the same in every clone)."""
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def comparison(args: str, root: Path = ROOT) -> str:
    """summary_table of the archive folder and options of a block's marker (the folder relative to root)."""
    parsed = compare.parse_args(shlex.split(args))
    with working_directory(root):
        runs = find_runs(parsed.paths)
    return summary_table(runs, parsed.threshold, reps=parsed.bootstrap_reps, seed=parsed.seed)


def section_table(markdown: str, section: str) -> str:
    """The first Markdown table of `section` (see SECTIONS) in summary_table's output and the notes
    under it (a paragraph after one blank line whose lines start with NOTE), with a newline."""
    if section not in SECTIONS:
        raise SystemExit(f"refresh_results: unknown section {section!r}; options: {', '.join(SECTIONS)}")
    lines = markdown.splitlines()
    heading = SECTIONS[section]
    start = 0 if heading is None else lines.index(heading)
    first = next(i for i in range(start, len(lines)) if lines[i].startswith("|"))
    end = next((i for i in range(first, len(lines)) if not lines[i].startswith("|")), len(lines))
    if end + 1 < len(lines) and lines[end] == "" and lines[end + 1].startswith(NOTE):
        end = next((i for i in range(end + 1, len(lines)) if lines[i] == ""), len(lines))
    return "\n".join(lines[first:end]) + "\n"


def prose_text(args: str, kind: str, root: Path = ROOT) -> str:
    """The generated sentences of a prose block's kind for the archive folders and options of its marker.
    A block may span experiments (PPO's critic across `compare` and `compare_tokens`): each folder's
    runs are read, and held to one setting per arm, on their own."""
    parsed = compare.parse_args(shlex.split(args))
    with working_directory(root):
        runs = [run for path in parsed.paths for run in find_runs([path])]
    return prose(kind, runs, reps=parsed.bootstrap_reps, seed=parsed.seed)


def refreshed(text: str, root: Path = ROOT) -> str:
    """`text` with every archive block's and prose block's body regenerated from the archive."""
    cache: dict[str, str] = {}

    def body(match: re.Match[str]) -> str:
        args = match["args"].strip()
        if args not in cache:
            cache[args] = comparison(args, root)
        return match.group(1) + section_table(cache[args], match["section"]) + match.group(5)

    def sentences(match: re.Match[str]) -> str:
        return match.group(1) + prose_text(match["args"].strip(), match["kind"], root) + match.group(5)

    return PROSE_BLOCK.sub(sentences, BLOCK.sub(body, text))


def quoted_experiments(root: Path = ROOT) -> dict[str, str]:
    """Each quoted archive folder -> the compare arguments of its first block."""
    found: dict[str, str] = {}
    for path in documents(root):
        for match in BLOCK.finditer(path.read_text(encoding="utf-8")):
            args = match["args"].strip()
            found.setdefault(shlex.split(args)[0], args)
    return found


def stale(root: Path = ROOT) -> list[str]:
    """What is out of date: documents whose blocks differ from the archive, comparison.md files that
    differ from (or lack) what scripts.compare writes, archived experiments that no document quotes."""
    out = [
        str(p)
        for p in documents(root)
        if refreshed(p.read_text(encoding="utf-8"), root) != p.read_text(encoding="utf-8")
    ]
    quoted = quoted_experiments(root)
    for folder, args in quoted.items():
        md = root / folder / "comparison.md"
        if not md.is_file() or md.read_text(encoding="utf-8") != comparison(args, root):
            out.append(str(md))
    results = root / "docs" / "results"
    for experiment in sorted(p for p in results.iterdir() if p.is_dir()) if results.is_dir() else []:
        if f"docs/results/{experiment.name}" not in quoted:
            out.append(f"{experiment} (archived, quoted by no document)")
    return out


def refresh(root: Path = ROOT) -> list[Path]:
    """Rewrite the blocks of every document and each quoted experiment's comparison.md and .png;
    returns the files written."""
    written = []
    for path in documents(root):
        text = path.read_text(encoding="utf-8")
        if (new := refreshed(text, root)) != text:
            path.write_text(new, encoding="utf-8")
            written.append(path)
    for folder, args in quoted_experiments(root).items():
        parsed = compare.parse_args(shlex.split(args))
        with working_directory(root):
            runs = find_runs(parsed.paths)
        (root / folder / "comparison.md").write_text(comparison(args, root), encoding="utf-8")
        plot(
            runs,
            root / folder / "comparison.png",
            threshold=parsed.threshold,
            reps=parsed.bootstrap_reps,
            seed=parsed.seed,
        )
        written += [root / folder / "comparison.md", root / folder / "comparison.png"]
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.refresh_results", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--check", action="store_true", help="only list what is stale; exit status 1 if anything"
    )
    args = parser.parse_args(argv)
    if args.check:
        out = stale()
        for item in out:
            print(f"stale: {item}")
        sys.exit(1 if out else 0)
    for path in refresh():
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
