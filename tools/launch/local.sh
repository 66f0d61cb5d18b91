#!/usr/bin/env bash
# Run `experiments/train.py ARGS...` as N processes on this machine: one multi-process job, as on N hosts.
#
#   tools/launch/local.sh N ARGS...        e.g. tools/launch/local.sh 2 --config=configs/default.py:smoke
#
# Each process gets (mesh.clients x mesh.model) / N CPU devices and the coordinator runs on the loopback.
# Set FELLREC_ENTRY=experiments/evaluate.py (or compare.py) to launch another entry point. Prints each
# process's pid as it starts. When a process fails, the others are stopped and the script exits with the
# first failure's status; SIGTERM/SIGINT are passed on to every process (which checkpoint and exit 75, see
# docs/cluster.md), and the script exits with their status once all have ended.
set -uo pipefail
if [ $# -lt 1 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N ARGS...   (N: the number of processes)" >&2
  exit 2
fi
n=$1
shift
cd "$(dirname "$0")/../.."
entry=${FELLREC_ENTRY:-experiments/train.py}
port=${FELLREC_COORDINATOR_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export JAX_PLATFORMS=cpu JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$n"
export FELLREC_CPU_DEVICES_PER_PROCESS=${FELLREC_CPU_DEVICES_PER_PROCESS:-auto}

pids=()
signal_all() {  # $1: the signal
  for pid in "${pids[@]}"; do kill "-$1" "$pid" 2>/dev/null; done
}
trap 'signal_all TERM' TERM INT

for ((i = 0; i < n; i++)); do
  JAX_PROCESS_ID=$i python "$entry" "$@" &
  pids+=($!)
  echo "process $i: pid $!"
done

status=0
remaining=$n
while [ "$remaining" -gt 0 ]; do
  done_pid=""
  wait -n -p done_pid
  rc=$?
  [ -n "${done_pid:-}" ] || continue  # interrupted by a signal (passed on by the trap): keep waiting
  remaining=$((remaining - 1))
  if [ "$rc" -eq 75 ]; then  # preempted: checkpointed, to be relaunched (the others end the same way)
    [ "$status" -eq 0 ] && status=75
  elif [ "$rc" -ne 0 ] && { [ "$status" -eq 0 ] || [ "$status" -eq 75 ]; }; then
    status=$rc
    echo "process with pid $done_pid exited with status $rc: stopping the others" >&2
    signal_all KILL  # they would wait for it in their next collective
  fi
done
exit "$status"
