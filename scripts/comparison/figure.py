"""The comparison's figure: held-out accuracy and training task reward against step, generated
tokens and wall time, one colour per arm."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402

from scripts.comparison.curves import curve_band  # noqa: E402
from scripts.comparison.runs import ACCURACY, REWARD, STEP, TOKENS, WALL, Run, group_runs  # noqa: E402
from scripts.comparison.tables import BOOTSTRAP_REPS  # noqa: E402

# Fixed colours so an algorithm looks the same in every figure; other arms take the rest in order
ALGORITHM_COLOURS = {"ppo": "tab:blue", "grpo": "tab:orange", "dapo": "tab:green"}
SPARE_COLOURS = ["tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan"]

ROWS = [
    (ACCURACY, "held-out accuracy (IQM, 95% CI)"),
    (REWARD, "training task reward of all samples (mean ± std)"),
]
# arms per legend row, and the figure height (a fraction) that each further row takes
LEGEND_COLUMNS = 4
LEGEND_ROW_HEIGHT = 0.03
COLUMNS = [(STEP, "step"), (TOKENS, "generated tokens"), (WALL, "wall time (min)")]


def label_colours(labels: Sequence[str]) -> dict[str, str]:
    """The fixed colour for a plain algorithm label; the spare colours, in order, for the rest, and
    beyond them matplotlib's tab20 (then its colours again): any number of arms gets colours, and
    distinct ones for up to 3 + 7 + 20 arms."""
    extra = [matplotlib.colors.to_hex(c) for c in plt.get_cmap("tab20").colors]
    pool = SPARE_COLOURS + extra
    others = [label for label in labels if label not in ALGORITHM_COLOURS]
    spare = {label: pool[i % len(pool)] for i, label in enumerate(others)}
    return {label: ALGORITHM_COLOURS.get(label) or spare[label] for label in labels}


def plot(
    runs: Sequence[Run],
    path: str | Path,
    *,
    threshold: float | None = None,
    reps: int = BOOTSTRAP_REPS,
    seed: int = 0,
) -> Path:
    """Save the 2x3 comparison grid (rows: accuracy, reward; columns: step, tokens, wall time) to path.

    Held-out accuracy is drawn as the IQM over seeds with its 95% stratified-bootstrap band (`reps`
    resamples from `seed`), the training reward as the mean with a ± std band (see curve_band);
    accuracy exists only at evaluation steps, so it is drawn with markers. The line is solid where
    every seed has a value and faint dashed where only some do. A grey dashed line marks the
    threshold if given.
    """
    groups = group_runs(runs)
    colours = label_colours(list(groups))
    fig, axes = plt.subplots(len(ROWS), len(COLUMNS), figsize=(16, 8.5), squeeze=False)
    for (key, y_label), ax_row in zip(ROWS, axes, strict=True):
        for (x_key, x_label), ax in zip(COLUMNS, ax_row, strict=True):
            for label, group in groups.items():
                x, centre, low, high, n = curve_band(group, key, x_key, reps=reps, seed=seed)
                if not len(x):
                    continue
                if x_key == WALL:
                    x = x / 60.0
                style = {
                    "color": colours[label],
                    "marker": "o" if key == ACCURACY else None,
                    "markersize": 3.5,
                }
                # Where some seeds have stopped (crashed, shorter), the curve jumps: draw that part faint
                ax.plot(x, centre, linestyle="--", linewidth=1.2, alpha=0.5, **style)
                ax.plot(x, np.where(n == len(group), centre, np.nan), linewidth=1.6, **style)
                ax.fill_between(x, low, high, color=colours[label], alpha=0.18, linewidth=0)
            if key == ACCURACY and threshold is not None:
                ax.axhline(threshold, color="0.4", linestyle="--", linewidth=0.9)
            if x_key == TOKENS:
                ax.xaxis.set_major_formatter(EngFormatter(sep=""))
            ax.set_xlabel(x_label)
            ax.set_ylabel(y_label)
            ax.grid(alpha=0.3)
    handles = [
        plt.Line2D(
            [],
            [],
            color=colours[label],
            linewidth=2,
            label=f"{label} ({len(group)} seed{'s' if len(group) != 1 else ''})",
        )
        for label, group in groups.items()
    ]
    # up to LEGEND_COLUMNS arms a legend row; each extra row moves the caption and the plots down
    extra_rows = max(math.ceil(len(handles) / LEGEND_COLUMNS) - 1, 0)
    fig.legend(
        handles=handles, loc="upper center", ncol=min(max(len(handles), 1), LEGEND_COLUMNS), frameon=False
    )
    fig.suptitle(
        "held-out accuracy: IQM over seeds with a 95% stratified-bootstrap band; training reward: mean"
        " ± std over seeds (faint dashed: not every seed has a value there)",
        y=0.955 - LEGEND_ROW_HEIGHT * extra_rows,
        fontsize=10,
        color="0.35",
    )
    fig.tight_layout(rect=(0, 0, 1, 0.93 - LEGEND_ROW_HEIGHT * extra_rows))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
