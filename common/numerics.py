"""Portable numerics (trainer.portable_numerics): the same seed and config give the same bits on
different x86 CPUs, by pinning every kernel path that would otherwise follow the CPU.

What picks the kernels, and so the rounding of every result, on a CPU run:
  - ATen's vectorised kernels (softmax, norms, activations, reductions) dispatch on the CPU's ISA
    (torch.backends.cpu.get_cpu_capability(): DEFAULT, AVX2, AVX512); ATEN_CPU_CAPABILITY caps it.
  - MKL's sgemm (every float32 nn.Linear and matmul) picks a code path per CPU and vendor;
    MKL_CBWR=COMPATIBLE pins the one path that MKL documents as giving the same results on Intel and
    non-Intel x86 CPUs. Its AVX2 branch is reproducible on Intel CPUs only: on an AMD EPYC MKL
    reports `CNR:AUTO` for MKL_CBWR=AVX2 (MKL_VERBOSE=1), i.e. it does not pin it.
  - oneDNN (bf16 matmuls, prepacked linears) JIT-compiles for the CPU; ONEDNN_MAX_CPU_ISA caps it.
  - the thread count splits reductions, so it must be fixed (trainer.num_threads), not "all cores".
  - timing-based choices (rollout.prepack_linears=auto) would pick other kernels on another machine.
The three libraries read their variables lazily, at their first operation, not when torch is
imported: `pin_portable_numerics` sets them and then checks that they took (ATen reports AVX2),
which fails only if an operation ran earlier in the process.

Pinning AVX2 is a choice of the lowest common ISA of the x86 machines runs are made on (AVX2 AMD,
AVX-512 AMD and Intel Xeons); a CPU without AVX2 cannot run portable numerics. It costs speed where
the CPU has more (measured in docs/performance.md), and reproduces no run made without it.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

import torch

from common.config_checks import require
from common.provenance import onednn_isa

# the variables portable numerics sets, and their values
PORTABLE_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "COMPATIBLE"}
# what torch.backends.cpu.get_cpu_capability() reports once the pin has taken
PORTABLE_CAPABILITY = "AVX2"


def pin_portable_numerics(num_threads: int | None, environ: MutableMapping[str, str] = os.environ) -> None:
    """Set PORTABLE_ENV in `environ` (this process's environment, inherited by the processes it
    starts) and check that ATen and oneDNN run AVX2 kernels; ConfigError when the thread count is not
    fixed, or when they do not (a CPU without AVX2, or a tensor operation already ran in this process,
    e.g. an earlier run of a sweep without portable numerics)."""
    require(
        num_threads is not None,
        "trainer.num_threads",
        "must be set under trainer.portable_numerics=true (the thread count splits reductions)",
        num_threads,
    )
    environ.update(PORTABLE_ENV)
    capability = torch.backends.cpu.get_cpu_capability()
    isa = onednn_isa()
    require(
        capability == PORTABLE_CAPABILITY and (isa is None or "AVX2" in isa),
        "trainer.portable_numerics",
        f"torch runs {capability} kernels and oneDNN {isa}, not AVX2: the CPU has no AVX2, or an operation "
        "ran before the pin (start it in a fresh process)",
        True,
    )
