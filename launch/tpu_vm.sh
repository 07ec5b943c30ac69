#!/bin/bash
# dret.train on every worker of a Cloud TPU VM slice (dret and its data already on each worker).
#   launch/tpu_vm.sh TPU_NAME ZONE ml_configs/X.py [--config.key=value ...]
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE ml_configs/X.py [--config.key=value ...]" >&2
  exit 2
fi
tpu=$1 zone=$2
shift 2
args=$(printf ' %q' "$@")
# DRET_DISTRIBUTED=auto: JAX finds the slice's workers and coordinator from the TPU metadata.
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all \
  --command "cd \${DRET_DIR:-~/dret} && DRET_DISTRIBUTED=auto python -m dret.train --config$args"
