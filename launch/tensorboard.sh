#!/usr/bin/env bash
# TensorBoard on a run's logs (rank 0 writes one log whatever the number of nodes).
#   bash launch/tensorboard.sh runs/tiny           # then open http://<host>:6006
# TB_PORT / TB_HOST override the port (6006) and bind address (0.0.0.0).
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
RUN=${1:-}
[ -n "$RUN" ] || die "usage: launch/tensorboard.sh RUN_DIR (the run's train.out_dir, e.g. runs/tiny)"
[ -d "$RUN/tensorboard" ] || die "'$RUN/tensorboard' does not exist; pass the train.out_dir of a run that has logged"
require_cmd tensorboard "pip install -r requirements.txt"
run tensorboard --logdir "$RUN/tensorboard" --port "${TB_PORT:-6006}" --host "${TB_HOST:-0.0.0.0}"
