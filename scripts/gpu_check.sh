#!/usr/bin/env bash
# The GPU check in one command, for a CUDA machine (docs/scaling.md):
#   1. the GPU-marked tests (pytest -m gpu: bf16 training step, vLLM greedy equality before and after a
#      weight sync, FSDP on NCCL where two GPUs exist);
#   2. scripts/benchmark.py on the GPU with the HF engine (its rollout also in bf16: --compare-engines) and,
#      where vLLM is installed, with vLLM;
#   3. one table of both: tokens/s, step time, GPU memory, vLLM over HF.
# Usage: bash scripts/gpu_check.sh [Hydra overrides for both benchmarks]
#   MODEL=<hub id or folder> picks the benchmark's model (default: Qwen/Qwen2.5-0.5B-Instruct when it can be
#   downloaded, else the packaged SmolLM2-135M-Instruct). Results: outputs/gpu_check/<time>/.
# Without a CUDA device it stops at once with one line and exit status 1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -c 'import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: no CUDA device visible (torch {torch.__version__}, CUDA build: {torch.version.cuda}); "
             "run it on a GPU machine with a CUDA build of torch (docs/scaling.md)")'

out=outputs/gpu_check/$(date +%Y-%m-%d_%H-%M-%S)
mkdir -p "$out"
MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
if [ -d "$MODEL" ] || "$PY" -c "import sys; from huggingface_hub import snapshot_download; snapshot_download(sys.argv[1])" \
        "$MODEL" >/dev/null 2>&1; then
    model=(model=hub "model.name_or_path=$MODEL")
else
    echo "gpu_check: $MODEL cannot be loaded here; benchmarking the packaged SmolLM2-135M-Instruct" >&2
    model=(model=smollm2-135m)
fi
# a workload that keeps a GPU busy: 32 prompts x G=8, up to 256 new tokens, bf16 forward passes
workload=(trainer.device=cuda trainer.bf16=true trainer.batch_size=32 rollout.group_size=8
    rollout.max_new_tokens=256 trainer.micro_batch_size=64 "${model[@]}" "$@")

status=0
"$PY" -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee "$out/tests.log" || status=1
"$PY" -m scripts.benchmark --steps 2 --out "$out/hf.json" --compare-engines hf,hf:bfloat16 "${workload[@]}" \
    rollout.engine=hf
results=("$out/hf.json")
if "$PY" -c "import vllm" >/dev/null 2>&1; then
    "$PY" -m scripts.benchmark --steps 2 --out "$out/vllm.json" --compare-engines "" "${workload[@]}" rollout.engine=vllm \
        rollout.gpu_memory_utilization=0.3
    results+=("$out/vllm.json")
else
    echo "gpu_check: vLLM is not installed (pip install vllm); HF engine only" >&2
fi
"$PY" -m scripts.report "${results[@]}" | tee "$out/table.md"
echo "gpu_check: results in $out; GPU tests $([ $status = 0 ] && echo passed || echo FAILED)"
exit $status
