"""What decides the bits is recorded (common.provenance.numerics_info), and trainer.portable_numerics
pins it (common.numerics): checked in fresh processes, since the kernels are chosen at a process's
first tensor operation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from common.config import ConfigError
from common.numerics import PORTABLE_ENV, pin_portable_numerics
from common.provenance import library_version, numerics_info
from tests.conftest import ROOT

CONFIG_TEXT = """PyTorch built with:
  - Intel(R) oneAPI Math Kernel Library Version 2024.2-Product Build 20240605 for Intel(R) 64 architecture
  - Intel(R) MKL-DNN v3.12.0 (Git Hash 80afa71049cd69a3df32adcccb623b12cd7baa22)
  - CPU capability usage: AVX512
"""


def python(code: str, **env: str) -> str:
    """stdout of `code` in a fresh interpreter at the repo root, with `env` added to the environment."""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_library_versions_from_torch_config_text():
    assert library_version(CONFIG_TEXT, "MKL") == "2024.2"
    assert library_version(CONFIG_TEXT, "oneDNN") == "3.12.0"
    assert library_version("no libraries", "MKL") is None


def test_numerics_info_names_capability_libraries_threads_and_a_digest():
    info = numerics_info()
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["threads"] == torch.get_num_threads()
    assert {"mkl", "onednn", "onednn_isa", "mkl_branch", "env", "config_digest", "digest"} <= info.keys()
    assert len(info["digest"]) == 12


def test_the_pinned_environment_shows_in_provenance_and_changes_the_digest():
    """A process started with PORTABLE_ENV runs ATen's AVX2 kernels and oneDNN's AVX2 ISA, records
    the variables, and gets another digest than a process without them (when this CPU has more than
    AVX2; on an AVX2 CPU only the recorded variables differ, and still the digest)."""
    code = "import json; from common.provenance import numerics_info; print(json.dumps(numerics_info()))"
    native = json.loads(python(code))
    pinned = json.loads(python(code, **PORTABLE_ENV))
    assert pinned["cpu_capability"] == "AVX2"
    assert pinned["env"] == PORTABLE_ENV
    assert pinned["mkl_branch"] == "COMPATIBLE"
    assert pinned["onednn_isa"] is None or "AVX2" in pinned["onednn_isa"]
    assert pinned["digest"] != native["digest"]


def test_pin_takes_in_a_fresh_process():
    out = python(
        "import torch; from common.numerics import pin_portable_numerics; pin_portable_numerics(1); "
        "print(torch.backends.cpu.get_cpu_capability())"
    )
    assert out.strip() == "AVX2"


def test_pin_needs_a_fixed_thread_count():
    with pytest.raises(ConfigError, match="^trainer.num_threads: must be set under"):
        pin_portable_numerics(None, environ={})


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() == "AVX2", reason="this CPU runs AVX2 anyway")
def test_pin_after_the_first_operation_fails_in_one_line():
    """This test process has long run tensor operations: ATen's kernels are chosen, the pin cannot take."""
    environ: dict[str, str] = {}
    with pytest.raises(ConfigError, match="^trainer.portable_numerics: torch runs") as err:
        pin_portable_numerics(1, environ=environ)
    assert environ == PORTABLE_ENV and "\n" not in str(err.value)


def metrics(run_dir) -> list[dict]:
    """metrics.jsonl without the timings (perf/), which differ between any two runs."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in rows]


def test_portable_run_equals_a_run_with_the_variables_set_by_hand(tmp_path):
    """debug=smoke with trainer.portable_numerics=true gives the metrics, to the bit, of the same run
    started with PORTABLE_ENV in its environment and plain linears (what the option resolves
    prepack_linears=auto to); its provenance records the pinned capability."""
    base = [sys.executable, "-m", "scripts.train", "debug=smoke", "trainer.num_threads=1"]
    runs = {
        "portable": (["trainer.portable_numerics=true"], {}),
        "by_hand": (["rollout.prepack_linears=never"], PORTABLE_ENV),
    }
    for name, (overrides, env) in runs.items():
        done = subprocess.run(
            [*base, *overrides, f"hydra.run.dir={tmp_path / name}"],
            cwd=ROOT,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr[-2000:]
    assert metrics(tmp_path / "portable") == metrics(tmp_path / "by_hand")
    start = json.loads((tmp_path / "portable" / "provenance.json").read_text())["starts"][0]
    assert start["machine"]["torch_cpu_capability"] == "AVX2"
    assert start["machine"]["numerics"]["env"] == PORTABLE_ENV
