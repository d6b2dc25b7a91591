#!/usr/bin/env bash
# One node, N processes (GPUs, or CPU processes with gloo) through the deepspeed launcher.
#   NPROC=8 CONFIG=configs/text8_s2moe.yaml bash launch/single_node.sh train.steps=1000
# Extra arguments are config overrides.
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
NPROC=${NPROC:-2}
check_common
choose_port free
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "NPROC must be a positive number of processes, got '$NPROC'"
require_cmd deepspeed "install the package first: pip install -r requirements.txt -e ."
require_data "$@"
cd "$REPO_ROOT" || die "cannot enter $REPO_ROOT"
run deepspeed --num_gpus "$NPROC" --master_port "$MASTER_PORT" --module s2moe_ds.train \
  --config "$CONFIG" "train.dist_timeout_s=$DIST_TIMEOUT" "$@"
