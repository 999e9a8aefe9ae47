"""The README as a newcomer meets it: short, every docs/ page linked, every link resolving, and the
table of config groups listing every option under configs/ (so it cannot go stale); the tuned
settings quoted in docs/ as the studies recorded them; no number from runs typed by hand in the
comparison sections (they come from generated blocks, scripts/refresh_results.py)."""

from __future__ import annotations

import re

import yaml

from tests.conftest import CONFIGS, ROOT

README = ROOT / "README.md"


def group_table() -> dict[str, str]:
    """The README's config-group table: group name -> its options cell."""
    text = README.read_text(encoding="utf-8")
    block = text.split("<!-- config-groups -->", 1)[1].split("<!-- /config-groups -->", 1)[0]
    rows = [line.strip("|").split(" | ") for line in block.splitlines() if line.startswith("| `")]
    return {row[0].strip().strip("`"): row[1] for row in rows}


def config_groups() -> dict[str, list[str]]:
    """Every config group under configs/ (hydra/launcher included) and its options, by file name."""
    groups = {}
    for folder in sorted(p for p in CONFIGS.rglob("*") if p.is_dir()):
        options = sorted(p.stem for p in folder.glob("*.yaml"))
        if options:
            groups[str(folder.relative_to(CONFIGS))] = options
    return groups


def test_every_config_group_option_is_in_the_readme_table():
    table = group_table()
    missing = {
        group: [o for o in options if f"`{o}`" not in table.get(group, "")]
        for group, options in config_groups().items()
    }
    assert {group: opts for group, opts in missing.items() if opts} == {}


def test_the_table_lists_no_option_that_does_not_exist():
    groups = config_groups()
    for group, cell in group_table().items():
        named = set(re.findall(r"`([\w-]+)`", cell))
        assert named <= set(groups[group]) | {"rollout.group_size", "metrics.jsonl"}, group


def test_readme_is_short_and_links_every_docs_page_and_every_link_resolves():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    links = set(re.findall(r"\]\(([^)#]+)\)", text))
    assert all((ROOT / link).exists() for link in links), sorted(x for x in links if not (ROOT / x).exists())
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert pages <= links, sorted(pages - links)
    for page in (ROOT / "docs").glob("*.md"):
        for link in re.findall(r"\]\(([^)#:]+)\)", page.read_text(encoding="utf-8")):
            assert (page.parent / link).exists(), f"{page.name}: {link}"


def test_tuned_settings_quoted_are_the_studies():
    """docs/configuration.md's table of tuned settings says what docs/tuning/<arm>.yaml (each
    study's record) holds: the best parameters and value, per arm, for every recorded study."""
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    rows = {line.split(" | ")[0].strip("| `"): line for line in text.splitlines() if line.startswith("| `")}
    studies = sorted((ROOT / "docs" / "tuning").glob("*.yaml"))
    assert studies
    for path in studies:
        study = yaml.safe_load(path.read_text(encoding="utf-8"))
        row = rows.get(path.stem, "")
        cells = [f"{v:.3g}" for v in study["best_params"].values()] + [f"{study['best_value']:.2f}"]
        assert all(cell in row for cell in cells) and study["commit"] in row, (path.stem, row, cells)


# The comparison sections: (file, first heading, the heading that ends it); every number from runs in
# them comes from a generated block (<!-- archive: ... --> or <!-- prose: ... -->)
COMPARISON_SECTIONS = [
    ("README.md", "## Comparing algorithms", "## Reading the code"),
    ("docs/results.md", "## At equal policy updates", "## Cost, and running it larger"),
]
# what is not a run's number: generated blocks, code, link targets, hand-written tables (arm
# descriptions, the paper's values), citations (Eq. 13, Table 1, et al. 2021, arXiv ids), and the
# statistics' own levels (95% intervals, 80% power), the model's name
NOT_RUN_NUMBERS = [
    r"<!-- (archive|prose): .*?<!-- /(archive|prose) -->",
    r"```.*?```",
    r"`[^`]*`",
    r"\]\([^)]*\)",
    r"^\|[^\n]*$",
    r"(Eq\.|Table) \d+|et al\. \d{4}|arXiv:\d+\.\d+",
    r"\b95%|\b80% power|SmolLM2-135M",
]


def hand_typed_numbers(text: str) -> list[str]:
    """The lines of `text` that still hold a digit once NOT_RUN_NUMBERS are taken out."""
    for pattern in NOT_RUN_NUMBERS:
        text = re.sub(pattern, " ", text, flags=re.DOTALL | re.MULTILINE)
    return [line.strip() for line in text.splitlines() if re.search(r"\d", line)]


def test_no_hand_typed_number_in_the_comparison_sections():
    for name, start, end in COMPARISON_SECTIONS:
        text = (ROOT / name).read_text(encoding="utf-8")
        section = text.split(start, 1)[1].split(end, 1)[0]
        assert hand_typed_numbers(section) == [], name


def test_a_typed_number_is_caught_and_a_generated_one_is_not():
    generated = "<!-- prose: docs/results/x : pairs -->\n`a` ends above `b` by 0.04\n<!-- /prose -->\n"
    assert hand_typed_numbers(generated + "`dapo5_dynamic_sampling` (Eq. 11, Table 1) [x](a1.md)\n") == []
    typed = "GRPO ends highest, IQM 0.65."
    assert hand_typed_numbers(generated + typed + "\n") == [typed]
    # a hand-written table row is skipped, the sentence after it is not
    assert hand_typed_numbers("| rung | 30 |\n" + typed + "\n") == [typed]
