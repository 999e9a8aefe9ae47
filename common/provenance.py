"""Where and from what a result came: the machine (CPU model and vector ISA, cores, GPU, torch), what
decides the bits of its floating-point results (`numerics_info`), and the code (git commit, and
whether the working tree differed from it).

A run writes both into `provenance.json` in its folder when it starts (scripts/train.py), so the
results archive (scripts/archive.py) can say for each published run which commit made it on which
machine; the benchmark reports the same machine block.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# The CPU flags that decide which kernels torch runs (AVX2 / AVX-512 / bf16 / AMX), in this order
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")

# Environment variables read when torch and its libraries load that choose their kernels (and so the
# rounding of every result): ATen's vector ISA, oneDNN's ISA cap, MKL's conditional numerical
# reproducibility branch, and the thread counts that split reductions
NUMERICS_ENV = (
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "MKL_CBWR",
    "MKL_ENABLE_INSTRUCTIONS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
)


def cpu_model(cpuinfo: str) -> str:
    """The "model name" of /proc/cpuinfo's text, or the platform's processor string if it has none."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return platform.processor() or platform.machine()


def cpu_vendor(cpuinfo: str) -> str:
    """The "vendor_id" of /proc/cpuinfo's text (GenuineIntel, AuthenticAMD), or "" if it has none."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "vendor_id":
            return value.strip()
    return ""


def read_cpuinfo() -> str:
    """/proc/cpuinfo's text; "" where there is none (not Linux)."""
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


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


def library_version(config: str, library: str) -> str | None:
    """The version `torch.__config__.show()`'s text gives for "MKL" or "oneDNN", else None.

    Example: "- Intel(R) MKL-DNN v3.12.0 (Git Hash 80afa71)" -> "3.12.0" for "oneDNN";
    "- Intel(R) oneAPI Math Kernel Library Version 2024.2-Product Build" -> "2024.2" for "MKL".
    """
    pattern = {"MKL": r"Math Kernel Library Version ([\w.]+)", "oneDNN": r"MKL-DNN v([\w.]+)"}[library]
    found = re.search(pattern, config)
    return found.group(1) if found else None


def stdout_of(fn: Callable[[], object]) -> str:
    """What `fn` writes to file descriptor 1 (C libraries included), captured through a temporary file."""
    sys.stdout.flush()
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(1)
        os.dup2(tmp.fileno(), 1)
        try:
            fn()
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        tmp.seek(0)
        return tmp.read().decode(errors="replace")


@functools.cache
def onednn_isa() -> str | None:
    """The ISA oneDNN dispatches to in this process (its CPU capped by ONEDNN_MAX_CPU_ISA), as its
    verbose mode names it on the first primitive, e.g. "Intel AVX-512 with Intel DL Boost and bfloat16
    support" or "Intel AVX2"; None without oneDNN or when the line does not come (once per process)."""
    if not torch.backends.mkldnn.is_available():
        return None

    def probe() -> None:
        weight = torch.ones(8, 8)
        with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON), torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, 2)
            torch.ops.mkldnn._linear_pointwise(torch.ones(2, 8), packed, None, "none", [], "")

    with contextlib.suppress(AttributeError, RuntimeError, OSError):
        found = re.search(r"info,cpu,isa:([^\n]+)", stdout_of(probe))
        return found.group(1).strip() if found else None
    return None


def numerics_info() -> dict[str, Any]:
    """What decides the bits of this process's CPU results: ATen's vector ISA
    (torch.backends.cpu.get_cpu_capability(), e.g. "AVX512" or "AVX2"), the oneDNN and MKL versions,
    the ISA oneDNN runs, MKL's code branch (MKL_CBWR, or "auto" and the CPU vendor, by which MKL
    dispatches when it is not pinned), the kernel-pinning environment (NUMERICS_ENV, unset ones left
    out), the intra-op thread count, and `config_digest`, a digest of torch.__config__.show() (build,
    compiler, libraries). `digest` is a digest of all of it: two runs with the same `digest` ran the same
    kernels, a run on another machine with the same `digest` is expected to give the same bits (runs
    that differ in it are not comparable bit for bit). Runs are grouped by it in comparisons."""
    config = torch.__config__.show()
    info = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl": library_version(config, "MKL"),
        "onednn": library_version(config, "oneDNN"),
        "onednn_isa": onednn_isa(),
        "mkl_branch": os.environ.get("MKL_CBWR") or f"auto ({cpu_vendor(read_cpuinfo()) or 'unknown'})",
        "env": {k: os.environ[k] for k in NUMERICS_ENV if k in os.environ},
        "threads": torch.get_num_threads(),
        "config_digest": hashlib.sha256(config.encode()).hexdigest()[:12],
    }
    info["digest"] = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:12]
    return info


def machine_info() -> dict[str, Any]:
    """The machine a result was measured on: CPU model and ISA flags, usable cores, torch threads,
    GPU (or none), the torch version, torch's CPU capability (`torch_cpu_capability`) and what decides
    the bits of its results (`numerics`: numerics_info)."""
    cpuinfo = read_cpuinfo()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model(cpuinfo),
        "isa": isa_flags(cpuinfo),
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "numerics": numerics_info(),
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
