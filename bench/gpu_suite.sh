#!/usr/bin/env bash
# Every GPU row of bench/ on one GPU, written into docs/benchmarks.md with the GPU named.
#
#   bench/gpu_suite.sh            # all parts, in this order
#   bench/gpu_suite.sh 1.3b       # 1.3B LoRA 480x832x81: ckpt / none / fp8 / compile / block offload /
#                                 #   activation offload / FFN chunks / attention ckpt / all of them
#   bench/gpu_suite.sh backends   # diffusers' attention backends on the same step (bench/step_throughput.py)
#   bench/gpu_suite.sh 14b        # 14B LoRA (random weights) at 480p and 720p with the planner's advice for 24 GiB
#
# Each settings row is a fresh process running wan-tune's own train() (bench/settings.py): step
# time against the first row, measured peak beside `wan-tune plan`'s prediction. SMOKE=1 runs the
# same parts on the tiny model on a CPU (what tests/test_bench_suite.py checks); DOCS=FILE writes
# elsewhere. Times are rough guides on an H100/H200-class GPU: 1.3b ~4 min, backends ~1 min, 14b
# ~5 min (building the random 14B folder once takes part of it), so run the parts as separate calls
# when a call is limited to 10 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
DOCS=${DOCS:-docs/benchmarks.md}
part=${1:-all}

if [ "${SMOKE:-0}" = 1 ]; then
  small=tiny; big=tiny; l480=3x8x12; b480=3x10x16; b720=3x12x20; steps=2
  rows_small="ckpt,none,block offload,all"  # the plumbing of each kind of row; compile: minutes on a CPU
else
  small=wan2.1-t2v-1.3b; big=wan2.1-t2v-14b; l480=21x60x104; b480=21x60x104; b720=21x90x160; steps=3
  rows_small="ckpt,none,fp8,compile,block offload,act. offload,FFN chunks,attn. ckpt,all"
fi

case "$part" in all|1.3b|backends|14b) ;; *) echo "gpu_suite.sh: unknown part '$part' (all, 1.3b, backends, 14b)" >&2; exit 2;; esac

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
