#!/usr/bin/env bash
# One prepared GPU run: CUDA correctness tests and the GPU speed targets, everything written to $OUT.
#
#   bash benchmarks/gpu/run.sh            # on a CUDA machine (bare: installs the wheels in .whl/, if any)
#   bash benchmarks/gpu/run.sh --smoke    # the same stages on CPU with tiny shapes (CI runs this)
#
# Stages, each under its own time limit and all inside GPU_RUN_BUDGET_S (450 s by default), so one
# failure or overrun never costs the others:
#   tests      pytest -m gpu (tests/test_gpu.py): CUDA vs fp32 CPU reference, bf16 step, QDuDe on 4-bit kernels
#   step       benchmarks/model_step.py: Qwen2-7B shape, bf16 + autocast, q/v r=16, 4096 tokens, checkpointing
#              off and on: DuDe vs PEFT LoRA vs PEFT DoRA in one process; profiler tables of DuDe and LoRA
#   init       benchmarks/init_time.py: SVD init of the 7B model's 56 q/v layers (randomized and exact)
#   eval       benchmarks/eval_throughput.py: GSM8K generation, batch 16 vs batch 1
#   ops        benchmarks/model_step.py --count-ops: operators (kernel launches) per step, one decoder layer
#   step_4bit  benchmarks/model_step.py --quant only: QDuDe vs QLoRA on an NF4 base (8 decoder layers), profiled
# Then benchmarks/gpu/summarize.py prints one table with the targets beside the numbers.
# $OUT gets run.log, summary.md, results.json and profile.txt (default OUT: outputs/gpu_run).
# Wheels for a machine without network: bash benchmarks/gpu/fetch_wheels.sh (writes .whl/).
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
SMOKE=0
case "${1:-}" in
    --smoke) SMOKE=1 ;;
    "") ;;
    *) echo "usage: bash benchmarks/gpu/run.sh [--smoke]" >&2; exit 2 ;;
esac
OUT=${OUT:-$REPO/outputs/gpu_run$([ $SMOKE = 1 ] && echo _smoke)}
mkdir -p "$OUT"
WORK=$(mktemp -d -t dude-gpu-XXXXXX)
BUDGET=${GPU_RUN_BUDGET_S:-450}
START=$SECONDS
STATUS=""
exec > >(tee "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
rm -f "$OUT/profile.txt"

if [ $SMOKE = 0 ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "error: installing the wheels in .whl/ failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$REPO
    PY=python3
else
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
    PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
fi
if [ $SMOKE = 1 ]; then
    export CUDA_VISIBLE_DEVICES="" DUDE_TEST_DEVICE=cpu
fi

stage() {  # stage NAME LIMIT_SECONDS COMMAND...: run it under the smaller of its limit and the budget left
    local name=$1 limit=$2 left rc t0
    shift 2
    left=$(( BUDGET - (SECONDS - START) - 10 ))
    (( left < limit )) && limit=$left
    if (( limit < 15 )); then
        echo "## $name: skipped, the time budget is spent"
        STATUS+="$name=skipped "
        return
    fi
    echo "## $name (limit ${limit} s): $*"
    t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    echo "## $name: exit $rc after $(( SECONDS - t0 )) s"
    STATUS+="$name=$rc "
}

"$PY" - <<'PY'
import importlib, torch
names = ["torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes"]
versions = []
for name in names:
    try:
        versions.append(f"{name} {importlib.import_module(name).__version__}")
    except Exception as exc:  # a missing optional package is reported, not fatal
        versions.append(f"{name} missing ({type(exc).__name__})")
print("# " + ", ".join(versions))
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"# {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, CUDA {torch.version.cuda}")
else:
    print("# no CUDA device: CPU")
PY
command -v nvidia-smi >/dev/null && [ $SMOKE = 0 ] && \
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,memory.used --format=csv

if [ $SMOKE = 1 ]; then
    stage tests 300 "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider --junitxml="$WORK/tests.xml"
    stage step 300 "$PY" benchmarks/model_step.py --tiny --device cpu --quant no --autocast on --warmup 1 \
        --json "$WORK/model_step.json" --profile dude --profile-file "$OUT/profile.txt"
    stage ops 120 "$PY" benchmarks/model_step.py --count-ops --device cpu --layers 1 --tokens 32 --autocast on \
        --json "$WORK/op_counts.json"
    stage init 120 "$PY" benchmarks/init_time.py --model tiny --device cpu --json "$WORK/init_time.json"
    stage eval 120 "$PY" benchmarks/eval_throughput.py --device cpu --hidden 64 --layers 1 --num-samples 4 \
        --max-new-tokens 8 --batch-sizes 1 4 --repeats 1 --json "$WORK/eval_throughput.json"
    stage step_4bit 300 "$PY" benchmarks/model_step.py --tiny --device cpu --quant only --warmup 1 \
        --json "$WORK/model_step_4bit.json"
else
    stage tests 120 "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider --junitxml="$WORK/tests.xml"
    stage step 200 "$PY" benchmarks/model_step.py --device cuda --quant no --json "$WORK/model_step.json" \
        --profile dude,lora --profile-file "$OUT/profile.txt"
    stage ops 60 "$PY" benchmarks/model_step.py --count-ops --device cuda --layers 1 --tokens 512 \
        --json "$WORK/op_counts.json"
    stage init 60 "$PY" benchmarks/init_time.py --device cuda --exact-layers 2 --json "$WORK/init_time.json"
    stage eval 60 "$PY" benchmarks/eval_throughput.py --device cuda --json "$WORK/eval_throughput.json"
    stage step_4bit 120 "$PY" benchmarks/model_step.py --device cuda --quant only --layers 8 --rounds 2 \
        --json "$WORK/model_step_4bit.json" --profile qdude,qlora --profile-file "$OUT/profile.txt"
fi

"$PY" benchmarks/gpu/summarize.py "$WORK" "$OUT"
echo "# stages: $STATUS; total $(( SECONDS - START )) s; outputs in $OUT"
rm -rf "$WORK"
case "$STATUS" in
    *=[1-9]* | *skipped*) exit 1 ;;
esac
