"""The W&B view of a comparison in one command: a saved workspace for one sweep group, its runs grouped
by arm, with the panels a comparison is read from.

    wandb login                                       # once, and the runs synced (docs/results.md)
    python -m scripts.wandb_view --group compare                  # entity: your default
    python -m scripts.wandb_view --group dapo_ablation --entity me --project rl-lab --name "DAPO ladder"
    python -m scripts.wandb_view --group compare --dry-run        # print the spec, save nothing

It builds the workspace with wandb-workspaces (the library W&B maintains for saved views), saves it as
a new view in the project and prints its URL:

    runs       the group's runs (W&B group = experiment_name), grouped by job type (= the arm; or
               --group-by algorithm): W&B draws each arm's mean over seeds with its min-max band
    sections   "Held-out accuracy" and "Training task reward (all samples)", each against step,
               generated tokens (sampling/tokens_total) and wall time (perf/wall_s); "Policy":
               KL to the reference, clip fractions, entropy, response length; "Budget": policy
               optimizer steps and generated tokens against step

`--dry-run` prints the workspace's spec (what would be saved) as JSON and needs no login.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

# x axes of the accuracy and reward panels: the step, the compute spent, the wall clock
X_AXES = [("Step", "step"), ("sampling/tokens_total", "generated tokens"), ("perf/wall_s", "wall time (s)")]
# section -> metrics plotted against step, one panel each (besides the x-axis sections)
POLICY_METRICS = [
    "kl/value",
    "policy/clipfrac",
    "policy/clipfrac_low",
    "policy/clipfrac_high",
    "policy/entropy",
    "rollout/response_length",
]
BUDGET_METRICS = ["policy/optimizer_steps_total", "sampling/tokens_total", "reward/mixed_group_frac"]
GROUP_BY = {"arm": "JobType", "algorithm": "config.algorithm.name"}


def build_workspace(
    group: str, *, entity: str, project: str = "rl-lab", name: str | None = None, group_by: str = "arm"
) -> Any:
    """The saved view (a wandb_workspaces Workspace, not yet saved) of sweep group `group`."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    def against(metric: str, title: str) -> list[Any]:
        return [wr.LinePlot(title=f"{title} vs {x_title}", x=x, y=[metric]) for x, x_title in X_AXES]

    def section(title: str, panels: list[Any]) -> Any:
        return ws.Section(name=title, panels=panels, is_open=True)

    groupby = GROUP_BY[group_by]
    key = ws.Metric(groupby) if "." not in groupby else ws.Config(groupby.partition(".")[2])
    return ws.Workspace(
        entity=entity,
        project=project,
        name=name or f"rl-lab {group}: by {group_by}",
        sections=[
            section("Held-out accuracy", against("eval/accuracy", "held-out accuracy")),
            section("Training task reward (all samples)", against("reward/correct", "task reward")),
            section("Policy", [wr.LinePlot(title=m, x="Step", y=[m]) for m in POLICY_METRICS]),
            section("Budget", [wr.LinePlot(title=m, x="Step", y=[m]) for m in BUDGET_METRICS]),
        ],
        runset_settings=ws.RunsetSettings(filters=[ws.Metric("Group") == group], groupby=[key]),
    )


def spec(workspace: Any) -> dict[str, Any]:
    """The workspace as plain data: the view spec that `save` sends to the server."""
    return workspace._spec  # the library's own serialisation, what Workspace.save sends


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.wandb_view", description=__doc__.splitlines()[0])
    parser.add_argument("--group", required=True, help="the W&B group of the sweep (its experiment_name)")
    parser.add_argument("--project", default="rl-lab")
    parser.add_argument("--entity", default=None, help="default: the logged-in account's entity")
    parser.add_argument("--name", default=None, help="the view's name")
    parser.add_argument("--group-by", choices=sorted(GROUP_BY), default="arm")
    parser.add_argument("--dry-run", action="store_true", help="print the spec as JSON; save nothing")
    args = parser.parse_args(argv)
    try:
        import wandb_workspaces  # noqa: F401
    except ImportError:
        raise SystemExit(
            "wandb_view: needs the wandb-workspaces package (pip install wandb-workspaces)"
        ) from None
    from common.logging import wandb_logged_in

    if args.dry_run:
        workspace = build_workspace(
            args.group,
            entity=args.entity or "<entity>",
            project=args.project,
            name=args.name,
            group_by=args.group_by,
        )
        print(json.dumps(spec(workspace), indent=1))
        return
    if not wandb_logged_in():
        raise SystemExit("wandb_view: W&B is not logged in (run `wandb login` or set WANDB_API_KEY)")
    import wandb

    entity = args.entity or wandb.Api().default_entity
    workspace = build_workspace(
        args.group, entity=entity, project=args.project, name=args.name, group_by=args.group_by
    )
    try:
        workspace.save()
    except Exception as err:  # the server's refusal (no such project, no rights, offline)
        print(f"wandb_view: could not save the view ({type(err).__name__}: {err})", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"saved view {workspace.name!r}: {workspace.url}")


if __name__ == "__main__":
    main()
