"""Numerics environments of a comparison's runs: what decides the bits a run computes (CPU model,
ISA flags, and where provenance.json records them, torch's CPU capability and a digest of torch's
build configuration). The same seed and config give other samples in another environment, so an
experiment whose runs span several of them does not compare arms under one set of numerics.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scripts.comparison.runs import Run

# provenance.json machine fields that decide the numerics (the last two where recorded)
NUMERICS_FIELDS = ("cpu", "isa", "torch_cpu_capability", "numerics")


def machine_starts(run: Run) -> list[dict[str, Any]]:
    """The machine block of every start of a run (provenance.json), [] when it has none."""
    try:
        provenance = json.loads((Path(run.path) / "provenance.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [start.get("machine", {}) for start in provenance.get("starts", [])]


def environment(machine: dict[str, Any]) -> str:
    """One line naming a machine's numerics: "AMD EPYC (avx2, fma)", plus capability and digest if set."""
    parts = [", ".join(machine.get("isa") or []) or "ISA not recorded"]
    parts += [f"{key} {machine[key]}" for key in NUMERICS_FIELDS[2:] if machine.get(key)]
    return f"{machine.get('cpu', 'unknown CPU')} ({'; '.join(parts)})"


def environments(runs: Sequence[Run]) -> dict[str, list[str]]:
    """Numerics environment -> the runs (label-s<seed>) that ran in it, in first-seen order; a resumed
    run that started in two environments is listed under both. Runs without provenance are left out."""
    found: dict[str, list[str]] = {}
    for run in runs:
        for env in dict.fromkeys(environment(machine) for machine in machine_starts(run)):
            found.setdefault(env, []).append(f"{run.label}-s{run.seed}")
    return found


def mixed_warning(runs: Sequence[Run]) -> str | None:
    """One warning naming the environments when the runs span more than one, else None."""
    found = environments(runs)
    if len(found) < 2:
        return None
    groups = "; ".join(f"{env}: {len(names)} runs" for env, names in found.items())
    return f"runs span {len(found)} numerics environments, so a seed is not the same run in each: {groups}"
