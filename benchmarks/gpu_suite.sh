#!/usr/bin/env bash
# The GPU suite: on one CUDA GPU with no network, install the missing packages offline, then run the loss benchmark
# (naive, TRL, Liger, lmdistill; first and later micro-batch; Qwen2.5 sizes and Liger's shape), the distillation step
# (micro->nano and the Qwen-vocabulary pair) and the on-policy step, in bf16, in under 8 minutes in all (each step
# has its own timeout; their sum is 480 s). Results in benchmarks/results/: loss_engine_cuda.json,
# distill_step_cuda.json, on_policy_step_cuda.json (also copied to $OUT when set); logs in ${OUT:-/tmp}/gpu_suite_logs/.
#
#   bash benchmarks/fetch_gpu_wheels.sh   # first, on a machine with network: .gpu_wheels/ and .gpu_data/ (git-ignored)
#   bash benchmarks/gpu_suite.sh          # then on the GPU machine, from a copy of the working tree with both folders
#   bash benchmarks/gpu_suite.sh --dry-run   # print the commands, run nothing
#   bash benchmarks/gpu_suite.sh --cpu       # the same Python commands on CPU at tiny sizes, results in /tmp: checks
#                                            # that they parse and run (no install; uses the current environment)
#
# Environment: PYTHON (default python3), LOSS_IMPLS (default naive,trl,lmdistill,liger; add liger_chunked for Liger's
# torch.compile'd chunked loss, which compiles in every process and may not fit the time), LMDISTILL_BENCH_DATA (the
# data folder; default ../shared/data, else .gpu_data/). Expects torch with CUDA, transformers, accelerate, peft,
# triton, safetensors, tokenizers already installed there; installs trl, liger-kernel, datasets (and dill,
# multiprocess) from .gpu_wheels/ with --no-deps, then this project with `pip install --no-deps -e .`.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODE=gpu
for arg in "$@"; do
  case $arg in
    --dry-run) MODE=dry ;;
    --cpu) MODE=cpu ;;
    -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_suite.sh: unknown option '$arg' (expected --dry-run, --cpu or --help)" >&2; exit 2 ;;
  esac
done
LOGS=${OUT:-${TMPDIR:-/tmp}}/gpu_suite_logs
mkdir -p "$LOGS"
touch "$LOGS/.started"  # results older than this are from an earlier run
export PYTHONUNBUFFERED=1 TRL_EXPERIMENTAL_SILENCE=1 TOKENIZERS_PARALLELISM=false
if [ -z "${LMDISTILL_BENCH_DATA:-}" ] && [ ! -d ../shared/data ] && [ -d .gpu_data ]; then
  export LMDISTILL_BENCH_DATA=$PWD/.gpu_data
fi
STATUS=()

step() {  # step NAME SECONDS COMMAND...: run with its own timeout; output to the console and $LOGS/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (timeout ${limit} s): $*"
  [ "$MODE" = dry ] && return 0
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
  rc=${PIPESTATUS[0]}
  STATUS+=("$name: exit $rc after $((SECONDS - t0)) s$([ "$rc" = 124 ] && echo ' (timed out)')")
  echo "== ${STATUS[-1]}"
}

if [ "$MODE" = cpu ]; then
  DEST=${TMPDIR:-/tmp}/gpu_suite_cpu
  mkdir -p "$DEST"
  LOSS=(--device cpu --shapes qwen,liger --n 64 --vocab 4096 --rounds 1 --repeats 1 --warmup 0 --no_sweep
        --impls naive,trl,lmdistill --threads 1 --out "$DEST/loss_engine.json")
  DISTILL=(--device cpu --pairs "micro->nano,qwen-vocab-512x4->256x2" --vocab_size 8192 --steps 2 --warmup 1
           --threads 1 --out "$DEST/distill_step.json")
  ONPOLICY=(--device cpu --steps 2 --rounds 1 --threads 1 --out "$DEST/on_policy_step.json")
  LIMITS=(300 400 200)
  RESULTS=("$DEST/loss_engine.json" "$DEST/distill_step.json" "$DEST/on_policy_step.json")
else
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  if [ -d .gpu_wheels ]; then
    step install-wheels 25 "$PY" -m pip install --no-index --no-deps --no-cache-dir --find-links .gpu_wheels \
      .gpu_wheels/*.whl
  else
    echo "no .gpu_wheels/ here: run bash benchmarks/fetch_gpu_wheels.sh on a machine with network first (TRL and" \
         "Liger are then measured only if already installed)"
  fi
  step install-project 20 "$PY" -m pip install --no-index --no-deps --no-build-isolation --no-cache-dir -e .
  step check-imports 15 "$PY" -c "
import importlib, torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO GPU VISIBLE'
print('torch', torch.__version__, 'CUDA', torch.version.cuda, gpu)
for m in ('transformers', 'accelerate', 'triton', 'pyarrow', 'datasets', 'trl', 'liger_kernel', 'lmdistill'):
    try:
        print(m, getattr(importlib.import_module(m), '__version__', 'ok'))
    except Exception as e:
        print(m, 'NOT importable:', type(e).__name__, e)
"
  LOSS=(--device cuda --rounds 1 --repeats 3 --warmup 1 --no_sweep --impls "${LOSS_IMPLS:-naive,trl,lmdistill,liger}")
  DISTILL=(--device cuda --pairs "micro->nano,qwen-vocab-512x4->256x2" --steps 10 --warmup 3)
  ONPOLICY=(--device cuda --steps 5 --rounds 1)
  LIMITS=(230 130 80)
  RESULTS=(benchmarks/results/loss_engine_cuda.json benchmarks/results/distill_step_cuda.json
           benchmarks/results/on_policy_step_cuda.json)
fi

step loss-engine "${LIMITS[0]}" "$PY" benchmarks/loss_engine.py "${LOSS[@]}"
step distill-step "${LIMITS[1]}" "$PY" benchmarks/distill_step.py "${DISTILL[@]}"
step on-policy-step "${LIMITS[2]}" "$PY" benchmarks/on_policy_step.py "${ONPOLICY[@]}"
[ "$MODE" = dry ] && exit 0

echo
printf '%s\n' "${STATUS[@]}"
echo "results (logs in $LOGS):"
for f in "${RESULTS[@]}"; do
  if [ "$f" -nt "$LOGS/.started" ]; then
    echo "  $f"
    [ -n "${OUT:-}" ] && [ "$MODE" = gpu ] && cp "$f" "$OUT"/
  else
    echo "  $f: not written (see the log)"
  fi
done
"$PY" - "${RESULTS[@]}" <<'EOF'
import json, sys
from pathlib import Path

for path in map(Path, sys.argv[1:]):
    if path.is_file():
        summary = json.loads(path.read_text()).get("summary", {})
        print(f"\n{path.name} summary:\n{json.dumps(summary, indent=1)[:4000]}")
EOF
