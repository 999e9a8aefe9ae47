"""The runs of a W&B group as comparison Runs (optional: needs wandb and a login)."""

from __future__ import annotations

from typing import Any

from scripts.comparison.runs import STEP, Run, assign_labels, config_get, merge_rows, parse_value, run_arm


def run_from_wandb(wandb_run: Any) -> Run:
    """A Run from a wandb.apis.public.Run: config, full history (_step -> step), finished = state."""
    config = dict(wandb_run.config)
    rows = []
    for record in wandb_run.scan_history():
        if record.get("_step") is None:
            continue
        row = {k: parse_value(v) for k, v in record.items() if not k.startswith("_") and v is not None}
        rows.append({**row, STEP: int(record["_step"])})
    algorithm, arm = run_arm(config)
    return Run(
        path=f"wandb:{'/'.join(wandb_run.path)}",
        algorithm=algorithm,
        arm=arm,
        label=arm,
        seed=config_get(config, "seed"),
        config=config,
        rows=merge_rows(rows),
        finished=wandb_run.state == "finished",
    )


def load_wandb_group(group: str, *, project: str, entity: str | None) -> list[Run]:
    """Every run of a W&B group; SystemExit with one line when W&B is missing, logged out or offline."""
    from common.logging import wandb_logged_in

    try:
        import wandb
    except ImportError:
        raise SystemExit("compare: --wandb-group needs the wandb package (pip install wandb)") from None
    if not wandb_logged_in():
        raise SystemExit("compare: W&B is not logged in (run `wandb login` or set WANDB_API_KEY)")
    try:
        api = wandb.Api()
        where = f"{entity or api.default_entity}/{project}"
        runs = [run_from_wandb(run) for run in api.runs(where, filters={"group": group})]
    except Exception as err:
        raise SystemExit(
            f"compare: could not read W&B group {group!r} (offline? {type(err).__name__}: {err})"
        ) from None
    if not runs:
        raise SystemExit(f"compare: no runs in W&B group {group!r} of {where}")
    return assign_labels(runs)
