#!/usr/bin/env bash
# Every GPU row of bench/ on one GPU, written into docs/benchmarks.md with the GPU named.
#
#   bench/gpu_suite.sh            # all parts, in this order
#   bench/gpu_suite.sh 1.3b       # 1.3B LoRA 480x832x81: ckpt / none / fp8 / compile / block offload /
#                                 #   activation offload / FFN chunks / attention ckpt / all of them
#   bench/gpu_suite.sh backends   # diffusers' attention backends on the same step (bench/step_throughput.py)
#   bench/gpu_suite.sh 14b        # 14B LoRA (random weights) at 480p and 720p with the planner's advice for 24 GiB
#   bench/gpu_suite.sh animate    # Wan2.2-Animate 14B LoRA (random weights) at 480x832x77: checkpointed, fp8
#
# Each settings row is a fresh process running wan-tune's own train() (bench/settings.py): step
# time against the first row, measured peak (allocated and reserved) and host RAM beside `wan-tune
# plan`'s prediction. SMOKE=1 runs the same parts on the tiny model on a CPU (what
# tests/test_bench_suite.py checks); DOCS=FILE writes elsewhere (with the device tool:
# DOCS=$OUT/benchmarks.md). From a clean checkout on a CUDA machine with a CUDA torch (PYTHON=...
# to pick the interpreter; default .venv/bin/python, else python3): it imports wan_tune from this
# checkout, keeps model folders, shards and runs in a temporary folder it deletes at the end
# (BENCH_DIR=DIR keeps them in DIR instead), and skips the compile row without a C compiler.
# Estimated on an H100/H200: 1.3b ~5 min, backends ~1 min, 14b ~7 min (writing the random 14B
# folder, 28.6 GB, is part of it), animate ~7 min (its folder: 34.5 GB): run the parts as separate
# calls under a 10-minute limit.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3 || command -v python)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the parents import wan_tune too, not only the rows
DOCS=${DOCS:-docs/benchmarks.md}
part=${1:-all}
case "$part" in all|1.3b|backends|14b|animate) ;; *) echo "gpu_suite.sh: unknown part '$part' (all, 1.3b, backends, 14b, animate)" >&2; exit 2;; esac

if [ -n "${BENCH_DIR:-}" ]; then
  export WAN_TUNE_BENCH_DIR="$BENCH_DIR"
else
  export WAN_TUNE_BENCH_DIR="$(mktemp -d "${TMPDIR:-/tmp}/wan-tune-bench.XXXXXX")"
  trap 'rm -rf "$WAN_TUNE_BENCH_DIR"' EXIT
fi
# torch makes its compile cache in TMPDIR on importing torch._dynamo (diffusers does): in the work
# folder, so the suite leaves nothing behind, and the compile row starts cold each time
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$WAN_TUNE_BENCH_DIR/torchinductor}"

if [ "${SMOKE:-0}" = 1 ]; then
  small=tiny; big=tiny; animate=tiny-animate; l480=3x8x12; b480=3x10x16; b720=3x12x20; a480=2x8x12; steps=2
  rows_small="ckpt,none,block offload,all,route 0.5,routes"  # the plumbing of each kind of row; compile: minutes on a CPU
else
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || {
    echo "gpu_suite.sh: $PY has no CUDA torch (install the CUDA build, or SMOKE=1 for the CPU smoke run)" >&2; exit 2; }
  small=wan2.1-t2v-1.3b; big=wan2.1-t2v-14b; animate=wan2.2-animate-14b; l480=21x60x104; b480=21x60x104; b720=21x90x160
  a480=20x60x104; steps=3  # Animate: 77 frames (+ the reference's latent frame)
  # No `none` row: 1.3B at 32,760 tokens without checkpointing keeps ~100 GB of activations.
  rows_small="ckpt,fp8,compile,block offload,act. offload,FFN chunks,attn. ckpt,all,route 0.25,route 0.5,routes"
  if ! command -v cc >/dev/null && ! command -v gcc >/dev/null; then
    echo "gpu_suite.sh: no C compiler here (torch.compile's Triton needs one): the compile row is skipped" >&2
    rows_small=${rows_small/compile,/}
  fi
fi


if [ "$part" = all ] || [ "$part" = 1.3b ]; then
  "$PY" bench/settings.py --variant "$small" --latent "$l480" --steps "$steps" --rows "$rows_small" --docs "$DOCS"
fi
if [ "$part" = all ] || [ "$part" = backends ]; then
  backends=native,_native_cudnn,_native_flash,flash,sage
  [ "${SMOKE:-0}" = 1 ] && backends=native
  "$PY" bench/step_throughput.py --variant "$small" --latent "$l480" --checkpointing --steps "$steps" --backends "$backends" --docs "$DOCS"
fi
if [ "$part" = all ] || [ "$part" = 14b ]; then
  for latent in "$b480" "$b720"; do
    "$PY" bench/settings.py --variant "$big" --latent "$latent" --steps 2 --rows plan --budget 24 --docs "$DOCS"
  done
fi
if [ "$part" = all ] || [ "$part" = animate ]; then
  # the plan counts the face adapters apart from the blocks and the motion encoder's forward: measured here
  "$PY" bench/settings.py --variant "$animate" --latent "$a480" --steps 2 --rows "ckpt,fp8" --docs "$DOCS"
fi
