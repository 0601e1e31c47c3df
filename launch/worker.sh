#!/usr/bin/env bash
# On each TPU worker (started by `launch/tpu.sh train` / `onpolicy`): load the shared environment, run the
# command, then copy the run directory (metrics, TensorBoard, HF export; on-policy shards) to the bucket. Exits
# with the command's status. With SIMPO_JAX_SYNC_EVERY=N (seconds) the directory is also copied every N seconds
# while the command runs, so that a preempted worker loses at most N seconds of finished files.
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
# Files being written (.tmp-*, renamed when whole) are never copied.
copy() { gcloud storage rsync --recursive --exclude='(^|.*/)\.tmp-[^/]*$' "$out" "$destination"; }
syncer=""
if [[ "${SIMPO_JAX_SYNC_EVERY:-0}" =~ ^[1-9][0-9]*$ ]]; then
  (
    # Stopped by a TERM: the sleep ends at once, a copy in progress first finishes (bash runs the trap after it).
    nap=""
    trap '[[ -n "$nap" ]] && kill "$nap" 2>/dev/null; exit 0' TERM
    while kill -0 "$child" 2>/dev/null; do
      sleep "$SIMPO_JAX_SYNC_EVERY" &
      nap=$!
      wait "$nap"
      kill -0 "$child" 2>/dev/null || break
      [[ -d "$out" ]] && { copy || echo "warning: copying $out to $destination failed (will retry)" >&2; }
    done
  ) < /dev/null &
  syncer=$!
fi
until wait "$child"; status=$?; ! kill -0 "$child" 2>/dev/null; do :; done
if [[ -n "$syncer" ]]; then  # the periodic copies end before the last one starts
  kill "$syncer" 2>/dev/null
  until wait "$syncer" 2>/dev/null; ! kill -0 "$syncer" 2>/dev/null; do :; done
fi
if [[ -d "$out" ]]; then
  copy || echo "warning: copying $out to $destination failed" >&2
fi
exit "$status"
