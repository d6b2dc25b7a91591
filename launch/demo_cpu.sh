#!/usr/bin/env bash
# The zero-setup demo: a tiny S2MoE trained on the built-in Python-docs corpus with the deepspeed
# launcher on 2 CPU processes (gloo, ZeRO 2), TensorBoard logs and a checkpoint written, evaluation
# printed. Each command is printed before it runs. Extra arguments are config overrides, e.g.
#   bash launch/demo_cpu.sh train.steps=300 model.moe.router=xmoe
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
cd "$REPO_ROOT"
NPROC=${NPROC:-2}
OUT=${OUT:-runs/tiny}
check_common
choose_port free

run s2moe prepare --config "$CONFIG"
# a demo reruns from scratch: move an earlier demo run (finished or not) aside instead of deleting it
if [ -d "$OUT" ] && [ -n "$(ls -A "$OUT")" ]; then
  run mv "$OUT" "$OUT.previous.$(date +%Y%m%d-%H%M%S)"
fi
run deepspeed --num_gpus "$NPROC" --master_port "$MASTER_PORT" --module s2moe_ds.train --config "$CONFIG" train.out_dir="$OUT" "$@"
run s2moe eval "$OUT" --split val
run s2moe eval "$OUT" --split test
run s2moe sample "$OUT" --prompt "The " --tokens 160
echo "TensorBoard logs: $OUT/tensorboard   (view: tensorboard --logdir $OUT/tensorboard)" >&2
