#!/usr/bin/env bash
# Many nodes through the deepspeed launcher.
#
# With passwordless ssh between nodes (the launcher starts every node over pdsh), on the first node:
#   HOSTFILE=hostfile MASTER_ADDR=node0 bash launch/multi_node.sh train.steps=1000
#   (hostfile lines: "<host> slots=<processes on that host>")
#
# Without ssh: run this on every node yourself, the same hostfile everywhere, each with its NODE_RANK:
#   NO_SSH=1 NODE_RANK=0 HOSTFILE=hostfile MASTER_ADDR=10.0.0.1 bash launch/multi_node.sh   # node 0
#   NO_SSH=1 NODE_RANK=1 HOSTFILE=hostfile MASTER_ADDR=10.0.0.1 bash launch/multi_node.sh   # node 1
# Extra arguments are config overrides (the same on every node).
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
HOSTFILE=${HOSTFILE:-}
NO_SSH=${NO_SSH:-0}
check_common
[ -n "$HOSTFILE" ] || die "set HOSTFILE to a hostfile with one '<host> slots=<N>' line per node"
[ -f "$HOSTFILE" ] || die "hostfile '$HOSTFILE' does not exist"
# every non-comment line must be '<host> slots=<N>' with N >= 1, each host once (DeepSpeed's own parser
# accepts slots=0 and starts no rank there, and a repeated host silently replaces the earlier line)
NODES=0
declare -A SEEN=()
LINENO_HF=0
while IFS= read -r line || [ -n "$line" ]; do
  LINENO_HF=$((LINENO_HF + 1))
  line=${line%%#*}
  [[ "$line" =~ ^[[:space:]]*$ ]] && continue
  [[ "$line" =~ ^[[:space:]]*([^[:space:]]+)[[:space:]]+slots=([0-9]+)[[:space:]]*$ ]] \
    || die "hostfile '$HOSTFILE' line $LINENO_HF is '$line'; expected '<host> slots=<N>'"
  host=${BASH_REMATCH[1]}
  slots=${BASH_REMATCH[2]}
  [ "$slots" -ge 1 ] || die "hostfile '$HOSTFILE' line $LINENO_HF gives $host slots=$slots; every host needs at least 1 slot (remove the line to leave a host out)"
  [ -z "${SEEN[$host]:-}" ] || die "hostfile '$HOSTFILE' lists $host twice (lines ${SEEN[$host]} and $LINENO_HF); give each host once"
  SEEN[$host]=$LINENO_HF
  NODES=$((NODES + 1))
done < "$HOSTFILE"
[ "$NODES" -ge 1 ] || die "hostfile '$HOSTFILE' has no '<host> slots=<N>' line"
[ -n "${MASTER_ADDR:-}" ] || die "set MASTER_ADDR to the address of the first host (rank 0), reachable from every node"
require_cmd deepspeed "install the package first: pip install -r requirements.txt -e ."
if [ "$NO_SSH" = "1" ]; then
  # every node runs this script itself and all must name one port: a fixed default, checked on node 0
  if [ "${NODE_RANK:-}" = "0" ]; then choose_port 29500; else MASTER_PORT=${MASTER_PORT:-29500}; fi
else
  choose_port free  # run on the first node (rank 0's)
fi
args=(--hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
if [ "$NO_SSH" = "1" ]; then
  [[ "${NODE_RANK:-}" =~ ^[0-9]+$ ]] || die "NO_SSH=1 needs NODE_RANK (0..$((NODES - 1))) for this node"
  [ "$NODE_RANK" -lt "$NODES" ] || die "NODE_RANK=$NODE_RANK but the hostfile lists $NODES nodes (0..$((NODES - 1)))"
  args+=(--no_ssh --node_rank "$NODE_RANK")
fi
require_data "$@"
cd "$REPO_ROOT" || die "cannot enter $REPO_ROOT"
run deepspeed "${args[@]}" --module s2moe_ds.train --config "$CONFIG" "train.dist_timeout_s=$DIST_TIMEOUT" "$@"
