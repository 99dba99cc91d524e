#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: the same command on every host (JAX finds the others).
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/1p3b.py gs://BUCKET/runs/1p3b [extra flags...]
#
# The first run copies the repository to every host and installs requirements there.
# The workdir must be on storage all hosts see (a gs:// bucket; orbax writes there
# directly). The prepared data (data.path) must be readable from every host too.
# On a TPU, jax.distributed.initialize() needs no arguments (config.dist.initialize=auto).
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,9p' "$0"; exit 2
fi
tpu="$1"; zone="$2"; config="$3"; workdir="$4"; shift 4
repo="$(cd "$(dirname "$0")/.." && pwd)"
remote_dir="parcae_jax"

gcloud compute tpus tpu-vm scp --recurse --zone="$zone" --worker=all "$repo" "$tpu:~/$remote_dir"
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  set -e; cd ~/$remote_dir
  python3 -m venv .venv && . .venv/bin/activate
  pip install -q -r requirements.txt 'jax[tpu]==0.10.2' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
  python -m parcae_jax.main --config=$config --workdir=$workdir $*
"
