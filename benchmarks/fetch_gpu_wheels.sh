#!/usr/bin/env bash
# Run on a machine with network, before benchmarks/gpu_suite.sh: the wheels the suite installs offline on the GPU
# machine, and the benchmark data beside them. Both folders are git-ignored and travel with the working tree.
#
#   bash benchmarks/fetch_gpu_wheels.sh            # -> .gpu_wheels/ (~2.7 MiB) and .gpu_data/ (~2.4 MiB)
#   bash benchmarks/fetch_gpu_wheels.sh --pyarrow  # also pyarrow (~53 MiB, most of the 64 MiB a device call carries):
#                                                  # only if the GPU machine's is older than datasets 5.2 needs (>= 24;
#                                                  # gpu_suite.sh prints the version it finds)
#
# The GPU machine (Python 3.12, torch 2.11 with CUDA, transformers, accelerate, peft, triton, safetensors,
# tokenizers, and numpy, pandas, pyarrow, psutil, pyyaml, jinja2, filelock, fsspec, huggingface-hub, tqdm, xxhash)
# lacks trl, liger-kernel and datasets, and has no network. Everything is fetched with --no-deps from this explicit
# list, so pip never pulls torch or CUDA. The list comes from their requirements
# (unzip -p WHEEL '*/METADATA' | grep ^Requires-Dist, extras left out):
#   trl 1.16.0           accelerate, datasets, huggingface_hub, jinja2, numpy, packaging, pandas, psutil, pyarrow,
#                        pyyaml, transformers: only datasets is missing there. trl imports datasets at import time
#                        (trl.kernels.chunked_divergence and trl.experimental.gkd included; checked by importing them
#                        with datasets blocked), so it cannot be skipped.
#   liger-kernel 0.8.5   torch, triton: nothing missing
#   datasets 5.2.0       filelock, numpy, pyarrow>=24, dill, pandas, tqdm, xxhash, multiprocess, fsspec,
#                        huggingface-hub, packaging, pyyaml: dill and multiprocess are missing
# The versions are the ones installed together in the project's CPU environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=(trl==1.16.0 liger-kernel==0.8.5 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)
for arg in "$@"; do
  case $arg in
    --pyarrow) WHEELS+=(pyarrow==26.0.1) ;;
    -h|--help) sed -n '2,/^set -/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "fetch_gpu_wheels.sh: unknown option '$arg' (expected --pyarrow or --help)" >&2; exit 2 ;;
  esac
done

mkdir -p .gpu_wheels
"$PY" -m pip download --no-deps --only-binary=:all: --implementation cp --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  -d .gpu_wheels "${WHEELS[@]}"

DATA=${LMDISTILL_BENCH_DATA:-../shared/data}
if [ -d "$DATA" ]; then
  mkdir -p .gpu_data
  cp -r "$DATA/tinyshakespeare.txt" "$DATA/alpaca_en_demo.json" "$DATA/minimind_tokenizer" .gpu_data/
else
  echo "warning: no benchmark data at $DATA (set LMDISTILL_BENCH_DATA); the distillation and on-policy steps will" \
       "skip on the GPU machine unless it has ../shared/data" >&2
fi

echo "wheels in .gpu_wheels/:"
ls -l .gpu_wheels
du -sh .gpu_wheels $([ -d .gpu_data ] && echo .gpu_data)
echo "next, on the GPU machine: bash benchmarks/gpu_suite.sh (the two folders must travel with the working tree)"
