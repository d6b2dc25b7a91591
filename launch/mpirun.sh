#!/usr/bin/env bash
# OpenMPI: mpirun starts the ranks; s2moe_ds finds its rank and world size through mpi4py
# (pip install -r requirements-mpi.txt; Debian/Ubuntu: apt-get install openmpi-bin libopenmpi-dev).
#   NP=2 bash launch/mpirun.sh train.steps=100
#   NP=16 HOSTS=node0:8,node1:8 MASTER_ADDR=node0 bash launch/mpirun.sh
# MPIRUN_ARGS adds options to mpirun (e.g. "--mca btl_tcp_if_include eth0").
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
NP=${NP:-2}
HOSTS=${HOSTS:-}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
check_common
choose_port free
[[ "$NP" =~ ^[1-9][0-9]*$ ]] || die "NP must be a positive number of ranks, got '$NP'"
require_cmd mpirun "install OpenMPI (apt-get install openmpi-bin libopenmpi-dev)"
"$PYTHON" -c "import mpi4py" 2> /dev/null || die "mpi4py is not installed; pip install -r requirements-mpi.txt"
require_data "$@"
args=(-np "$NP" -x MASTER_ADDR="$MASTER_ADDR" -x MASTER_PORT="$MASTER_PORT" -x PYTHONUNBUFFERED=1)
[ -n "$HOSTS" ] && args+=(--host "$HOSTS")
[ "$(id -u)" = "0" ] && args+=(--allow-run-as-root)
# more ranks than cores (CPU runs) is allowed; ranks share the cores
args+=(--oversubscribe)
# shellcheck disable=SC2206
[ -n "${MPIRUN_ARGS:-}" ] && args+=($MPIRUN_ARGS)
cd "$REPO_ROOT" || die "cannot enter $REPO_ROOT"
run mpirun "${args[@]}" "$PYTHON" -m s2moe_ds.train --config "$CONFIG" "train.dist_timeout_s=$DIST_TIMEOUT" "$@"
