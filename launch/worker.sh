#!/usr/bin/env bash
# On each TPU worker (started by `launch/tpu.sh train`): load the shared environment, run the training
# command, then copy the run directory (metrics, TensorBoard, HF export) to the bucket. Exits with the
# training command's status.
#
#   launch/worker.sh OUTPUT_DIR GS_DESTINATION COMMAND [ARGS ...]
set -uo pipefail

[[ $# -ge 3 ]] || { echo "usage: launch/worker.sh OUTPUT_DIR GS_DESTINATION COMMAND [ARGS ...]" >&2; exit 2; }
out="$1" destination="$2"
shift 2
if [[ -f "$HOME/.simpo_jax.env" ]]; then
  # shellcheck source=/dev/null
  . "$HOME/.simpo_jax.env"
fi
# `launch/tpu.sh stop` SIGTERMs the training; should this script get one too, it waits for the training's
# checkpoint and exit, then still copies the outputs.
trap 'echo "worker.sh: SIGTERM: waiting for the training to save its checkpoint" >&2' TERM
"$@" &
child=$!
until wait "$child"; status=$?; ! kill -0 "$child" 2>/dev/null; do :; done
if [[ -d "$out" ]]; then
  gcloud storage rsync --recursive "$out" "$destination" || echo "warning: copying $out to $destination failed" >&2
fi
exit "$status"
