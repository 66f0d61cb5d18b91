#!/usr/bin/env bash
# One fellrec_jax run on every worker of a Cloud TPU pod slice (one process per TPU VM host; JAX finds the
# pod's layout itself). Run from a machine with gcloud; the repository and its requirements must already
# be on every worker (e.g. the first command below), and the workdir on a shared bucket or file system.
#
#   tools/launch/tpu_pod.sh TPU_NAME ZONE --config=configs/games.py --workdir=/mnt/shared/runs/games \
#       --config.mesh.clients=32
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE ARGS..." >&2
  exit 2
fi
tpu=$1
zone=$2
shift 2
args=$(printf ' %q' "$@")
# gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all \
#     --command='git clone https://github.com/<you>/fellrec_jax && cd fellrec_jax && pip install -r requirements.txt "jax[tpu]"'
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all \
    --command="cd fellrec_jax && python experiments/train.py$args"
