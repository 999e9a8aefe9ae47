"""The published numbers rest on the results archive (scripts/refresh_results.py): every table that
README.md or docs/*.md quotes from docs/results/ is what `python -m scripts.compare` gives from the
archive today, each quoted experiment's comparison.md is that command's output, and every archived
experiment is quoted somewhere. Text and data cannot drift apart."""

from __future__ import annotations

from scripts import refresh_results
from tests.test_compare import write_run


def test_the_documents_and_comparison_files_equal_what_the_archive_gives():
    assert refresh_results.stale() == []


def test_a_changed_number_a_missing_comparison_and_an_unquoted_experiment_are_caught(tmp_path):
    # an archive of two synthetic runs, a README quoting its iqm section, then one digit changed
    archive = tmp_path / "docs" / "results" / "toy"
    for seed in (0, 1):
        write_run(archive, "grpo", seed, steps=2, accuracy={0: 0.2, 2: 0.4 + 0.1 * seed}, tokens_per_step=10,
                  step_s=1, kl_per_step=None)  # fmt: skip
    marker = "<!-- archive: docs/results/toy --threshold 0.5 --bootstrap-reps 100 : iqm -->\n"
    readme = tmp_path / "README.md"
    readme.write_text(f"# toy\n\n{marker}(to be filled)\n<!-- /archive -->\n")
    assert refresh_results.stale(tmp_path) == [str(readme), str(archive / "comparison.md")]
    written = refresh_results.refresh(tmp_path)
    assert readme in written and (archive / "comparison.png").is_file()
    assert refresh_results.stale(tmp_path) == []
    text = readme.read_text()
    # final accuracies 0.4 and 0.5: IQM 0.450
    assert "| grpo | final | 2 | 0.450 | [0.400, 0.500] | 0.450 ± 0.071 |" in text
    readme.write_text(text.replace("0.450", "0.460", 1))
    assert refresh_results.stale(tmp_path) == [str(readme)]
    readme.write_text("# toy\n")
    assert refresh_results.stale(tmp_path) == [f"{archive} (archived, quoted by no document)"]


def test_sections_are_the_tables_of_compares_markdown_with_their_notes():
    markdown = "intro\n\n| a |\n|---|\n| 1 |\n\n## Interquartile mean\n\ntext\n\n| b |\n|---|\n| 2 |\n"
    assert refresh_results.section_table(markdown, "summary") == "| a |\n|---|\n| 1 |\n"
    assert refresh_results.section_table(markdown, "iqm") == "| b |\n|---|\n| 2 |\n"
    noted = markdown + "\nNote: with 3 runs ...\nNote: best ...\n\nnot a note\n"
    notes = "\nNote: with 3 runs ...\nNote: best ...\n"
    assert refresh_results.section_table(noted, "iqm") == "| b |\n|---|\n| 2 |\n" + notes


def test_a_prose_block_is_generated_and_a_changed_number_in_it_is_caught(tmp_path):
    # two grpo and two dapo runs: final accuracies (0.4, 0.5) and (0.6, 0.7); C(4, 2) = 6 splits, only
    # the observed one and its mirror reach |d| = 0.2 -> p = 2/6 = 0.333, one pair so Holm leaves it
    archive = tmp_path / "docs" / "results" / "toy"
    for arm, base in (("grpo", 0.4), ("dapo", 0.6)):
        for seed in (0, 1):
            write_run(archive, arm, seed, steps=2, accuracy={0: 0.2, 2: base + 0.1 * seed},
                      tokens_per_step=10, step_s=1, kl_per_step=None)  # fmt: skip
    marker = "<!-- archive: docs/results/toy --bootstrap-reps 100 : significance -->\n<!-- /archive -->\n"
    prose = "<!-- prose: docs/results/toy --bootstrap-reps 100 : pairs -->\n<!-- /prose -->\n"
    readme = tmp_path / "README.md"
    readme.write_text(f"# toy\n\n{marker}\n{prose}")
    refresh_results.refresh(tmp_path)
    text = readme.read_text()
    assert "`grpo` ends below `dapo` by 0.200, not separated (Holm p = 0.333;" in " ".join(text.split())
    assert "| final | grpo | dapo | 2, 2 | -0.200 | 0.333 | 0.333 | no |" in text
    readme.write_text(text.replace("by 0.200", "by 0.300"))
    assert refresh_results.stale(tmp_path) == [str(readme)]
