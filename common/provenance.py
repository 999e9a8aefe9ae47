"""Where and from what a result came: the machine (CPU model and vector ISA, cores, GPU, torch) and
the code (git commit, and whether the working tree differed from it).

A run writes both into `provenance.json` in its folder when it starts (scripts/train.py), so the
results archive (scripts/archive.py) can say for each published run which commit made it on which
machine; the benchmark reports the same machine block.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

# The CPU flags that decide which kernels torch runs (AVX2 / AVX-512 / bf16 / AMX), in this order
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def cpu_model(cpuinfo: str) -> str:
    """The "model name" of /proc/cpuinfo's text, or the platform's processor string if it has none."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return platform.processor() or platform.machine()


def isa_flags(cpuinfo: str) -> list[str]:
    """Which of ISA_FLAGS the first CPU of /proc/cpuinfo's text lists, in ISA_FLAGS order.

    Example: "flags : fpu sse avx2 fma avx512f" -> ["avx2", "fma", "avx512f"]
    """
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            present = set(value.split())
            return [flag for flag in ISA_FLAGS if flag in present]
    return []


def machine_info() -> dict[str, Any]:
    """The machine a result was measured on: CPU model and ISA flags, usable cores, torch threads,
    GPU (or none) and the torch version."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:  # not Linux
        cpuinfo = ""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model(cpuinfo),
        "isa": isa_flags(cpuinfo),
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def code_version(repo: Path) -> dict[str, Any]:
    """The git commit of `repo` and whether tracked files differed from it (`dirty`); commit None
    outside a git checkout or without git."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(dirty) if commit else None}


def record_start(run_dir: Path, repo: Path) -> dict[str, Any]:
    """Append this start of the run (time, commit, machine) to run_dir/provenance.json; a resumed
    run has one entry per start. Returns the entry."""
    path = run_dir / "provenance.json"
    entry = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **code_version(repo), "machine": machine_info()}
    starts = []
    if path.is_file():
        try:
            starts = json.loads(path.read_text(encoding="utf-8"))["starts"]
        except (ValueError, KeyError, TypeError):
            starts = []  # a damaged file is replaced, not fatal
    path.write_text(json.dumps({"starts": [*starts, entry]}, indent=1) + "\n", encoding="utf-8")
    return entry
