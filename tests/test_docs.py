"""The README as a newcomer meets it: short, every docs/ page linked, every link resolving, and the
table of config groups listing every option under configs/ (so it cannot go stale); the tuned
settings quoted in docs/ as the studies recorded them."""

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
