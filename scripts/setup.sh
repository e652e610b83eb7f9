#!/usr/bin/env bash
# Set up a virtualenv for dude_trl and fetch the offline demo model.
#   bash scripts/setup.sh          # runtime: torch, the package, SmolLM2-135M-Instruct
#   bash scripts/setup.sh --dev    # plus pytest, bitsandbytes, deepspeed, gguf (what the tests need)
# VENV=path picks another virtualenv location (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS="[gguf]"
[ "${1:-}" = "--dev" ] && EXTRAS="[dev]"

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# pip -qq prints errors only (a failed install still stops here): its notes about a machine's own
# index configuration and setuptools' editable-install banner are nothing a user can act on.
"$VENV/bin/python" -m pip install -qq --upgrade pip
# Install torch first: an unpinned torch pulled in by a dependency would be the multi-GB CUDA build.
"$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/python" -m pip install -qq "torch==2.13.0"
# DeepSpeed compiles its ops lazily; DS_BUILD_OPS=0 keeps the install pure Python.
DS_BUILD_OPS=0 "$VENV/bin/python" -m pip install -qq -e ".${EXTRAS}"
"$VENV/bin/python" scripts/fetch_smollm2.py --out models/SmolLM2-135M-Instruct
echo "Set up $VENV."
