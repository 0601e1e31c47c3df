#!/usr/bin/env bash
# Run simpo_jax on a Cloud TPU VM slice (or several slices): create, set up, train, follow, stop, delete.
#
#   launch/tpu.sh COMMAND --name NAME --zone ZONE [options] [--dry-run] [-- --config.<field>=<value> ...]
#
# Commands:
#   create   create the TPU VM (gcloud compute tpus tpu-vm create), or a queued resource with --queued
#            (gcloud compute tpus queued-resources create; required for --num-slices > 1)
#   setup    on every worker: clone --repo at --commit, pip install it with the TPU extra, write the shared
#            environment file (--env KEY=VALUE, --env-from-host NAME; secret values are never printed)
#   train    on every worker (--worker=all): the same python -m simpo_jax.train --config ... command,
#            detached, logging to ~/simpo_jax_<run>.log; checkpoints in gs://BUCKET/RUN/checkpoints and,
#            when the run ends, the run directory (metrics, TensorBoard, HF export) in gs://BUCKET/RUN/output
#   onpolicy on every worker: python -m simpo_jax.onpolicy --config ... --stage STAGE (on-policy preference data:
#            sample, score, binarize), detached like train; worker 0 first copies gs://BUCKET/RUN/output (the
#            shards of an earlier, stopped run) into its output directory, so a new slice resumes it; the output
#            directory goes to gs://BUCKET/RUN/output every 5 minutes while the command runs, and when it ends
#   logs     stream worker 0's training (or onpolicy) log
#   stop     SIGTERM the training on every worker: it saves a checkpoint of the current step and exits (an
#            onpolicy run stops too: its finished shards are kept, the current one is redone on resume)
#   status   describe the TPU VM / queued resource
#   delete   delete the TPU VM / queued resource
#
# Options:
#   --name NAME                 TPU VM or queued-resource name (required)
#   --zone ZONE                 e.g. us-east5-a (required)
#   --project PROJECT           default: gcloud's configured project
#   --accelerator-type TYPE     v5p-16, v5litepod-64, v6e-16, v4-32, ... (create; default v5p-16)
#   --runtime-version VERSION   TPU software version (create; default chosen from the accelerator type)
#   --spot | --preemptible      spot capacity, or the older preemptible VMs (create)
#   --queued                    use a queued resource (create, and every later command for that resource)
#   --num-slices N              multi-slice: N slices of the accelerator type, joined over DCN (implies --queued)
#   --repo URL                  git repository to install on the workers (setup; default: this checkout's origin)
#   --commit SHA                commit to install (setup; default: this checkout's HEAD)
#   --env KEY=VALUE             environment variable for every worker (setup; repeatable)
#   --env-from-host NAME        copy NAME's value from this shell to every worker, never printed (setup; repeatable)
#   --config FILE[:SLICE]       config file in the repo, e.g. configs/llama3_8b_instruct.py:v5p-16 (train)
#   --bucket gs://BUCKET        where checkpoints and outputs go (train)
#   --run NAME                  run name, may contain / (train, onpolicy, logs; default: the config file's name)
#   --stage STAGE               onpolicy: all (sample and score), sample or score (default all)
#   --wait                      train in the foreground: return when every worker is done, with its status
#   --fetch DIR                 with --wait: then copy gs://BUCKET/RUN/output to the local DIR (e.g. for sweeps)
#   --dry-run                   print the exact gcloud commands, one per line, and run nothing
#   -- ARGS                     extra --config.<field>=<value> overrides for train and onpolicy
set -euo pipefail

die() { echo "error: $*" >&2; exit 2; }

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

COMMAND="${1:-}"
[[ -z "$COMMAND" || "$COMMAND" == "-h" || "$COMMAND" == "--help" ]] && { usage; exit 0; }
shift

ENV_TMP=""
NAME="" ZONE="" PROJECT="" ACCELERATOR="v5p-16" RUNTIME="" CAPACITY="" QUEUED=0 SLICES=1
REPO="" COMMIT="" CONFIG="" BUCKET="" RUN="" DRY_RUN=0 WAIT=0 FETCH="" STAGE="all"
ENV_PAIRS=() ENV_FROM_HOST=() OVERRIDES=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --accelerator-type) ACCELERATOR="$2"; shift 2 ;;
    --runtime-version) RUNTIME="$2"; shift 2 ;;
    --spot) CAPACITY="--spot"; shift ;;
    --preemptible) CAPACITY="--preemptible"; shift ;;
    --queued) QUEUED=1; shift ;;
    --num-slices) SLICES="$2"; shift 2 ;;
    --repo) REPO="$2"; shift 2 ;;
    --commit) COMMIT="$2"; shift 2 ;;
    --env) ENV_PAIRS+=("$2"); shift 2 ;;
    --env-from-host) ENV_FROM_HOST+=("$2"); shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --bucket) BUCKET="${2%/}"; shift 2 ;;
    --run) RUN="$2"; shift 2 ;;
    --wait) WAIT=1; shift ;;
    --fetch) FETCH="$2"; shift 2 ;;
    --stage) STAGE="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; OVERRIDES=("$@"); break ;;
    *) die "unknown option $1 (see launch/tpu.sh --help)" ;;
  esac
done

[[ -n "$NAME" ]] || die "--name is required"
[[ -n "$ZONE" ]] || die "--zone is required"
[[ "$SLICES" =~ ^[1-9][0-9]*$ ]] || die "--num-slices must be a positive integer, got '$SLICES'"
(( SLICES > 1 )) && QUEUED=1

# One word, quoted for a POSIX shell only when it needs it (single quotes).
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@,+%~-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Run (or, with --dry-run, print) one command; the printed line is exactly what would run.
run() {
  if (( DRY_RUN )); then
    local word line=""
    for word in "$@"; do line+="$(quote "$word") "; done
    echo "${line% }"
  else
    "$@"
  fi
}

GCLOUD_SCOPE=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && GCLOUD_SCOPE+=(--project "$PROJECT")

# ssh to every worker of every slice, running one shell command there.
on_workers() {
  local workers="$1" command="$2"
  if (( QUEUED )); then
    run gcloud compute tpus queued-resources ssh "$NAME" "${GCLOUD_SCOPE[@]}" --node=all --worker="$workers" \
      --command="$command"
  else
    run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_SCOPE[@]}" --worker="$workers" --command="$command"
  fi
}

default_runtime() {
  case "$1" in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) die "no default --runtime-version for accelerator type '$1'; pass --runtime-version" ;;
  esac
}

REMOTE_DIR="simpo_jax"
ENV_FILE=".simpo_jax.env"

cmd_create() {
  local runtime="$RUNTIME"
  [[ -n "$runtime" ]] || runtime="$(default_runtime "$ACCELERATOR")" || exit 2
  if (( QUEUED )); then
    local nodes=(--node-id "$NAME")
    (( SLICES > 1 )) && nodes=(--node-count "$SLICES" --node-prefix "$NAME")
    local capacity=()
    [[ "$CAPACITY" == "--spot" ]] && capacity=(--spot)
    [[ "$CAPACITY" == "--preemptible" ]] && die "queued resources take --spot, not --preemptible"
    run gcloud compute tpus queued-resources create "$NAME" "${GCLOUD_SCOPE[@]}" "${nodes[@]}" \
      --accelerator-type "$ACCELERATOR" --runtime-version "$runtime" ${capacity[@]+"${capacity[@]}"}
  else
    local capacity=()
    [[ -n "$CAPACITY" ]] && capacity=("$CAPACITY")
    run gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_SCOPE[@]}" --accelerator-type "$ACCELERATOR" \
      --version "$runtime" ${capacity[@]+"${capacity[@]}"}
  fi
}

cmd_setup() {
  local repo="${REPO:-$(git -C "$(dirname "$0")" remote get-url origin 2>/dev/null || true)}"
  local commit="${COMMIT:-$(git -C "$(dirname "$0")" rev-parse HEAD 2>/dev/null || true)}"
  [[ -n "$repo" ]] || die "--repo is required (this checkout has no origin remote)"
  [[ "$commit" =~ ^[0-9a-fA-F]{7,40}$ ]] || die "--commit must be a commit hash, got '$commit'"
  # The environment file: written locally (mode 600), copied to every worker, its contents never printed.
  local env_file
  env_file="$(mktemp)"
  ENV_TMP="$env_file"
  trap 'rm -f "$ENV_TMP"' EXIT
  chmod 600 "$env_file"
  local pair name
  for pair in ${ENV_PAIRS[@]+"${ENV_PAIRS[@]}"}; do
    [[ "$pair" == *=* ]] || die "--env takes KEY=VALUE, got '$pair'"
    printf 'export %s=%q\n' "${pair%%=*}" "${pair#*=}" >> "$env_file"
  done
  for name in ${ENV_FROM_HOST[@]+"${ENV_FROM_HOST[@]}"}; do
    [[ -n "${!name:-}" ]] || die "--env-from-host $name: $name is not set in this shell"
    printf 'export %s=%q\n' "$name" "${!name}" >> "$env_file"
  done
  if (( QUEUED )); then
    run gcloud compute tpus queued-resources scp "$env_file" "$NAME:~/$ENV_FILE" "${GCLOUD_SCOPE[@]}" --node=all \
      --worker=all
  else
    run gcloud compute tpus tpu-vm scp "$env_file" "$NAME:~/$ENV_FILE" "${GCLOUD_SCOPE[@]}" --worker=all
  fi
  on_workers all "set -e; chmod 600 ~/$ENV_FILE; if [ ! -d ~/$REMOTE_DIR ]; then git clone $(quote "$repo") \
~/$REMOTE_DIR; fi; cd ~/$REMOTE_DIR && git fetch --quiet origin && git checkout --quiet $commit && \
python3 -m pip install --quiet -e '.[tpu]'"
}

run_name() {
  [[ -n "$RUN" ]] && { echo "$RUN"; return; }
  [[ -n "$CONFIG" ]] || die "--run or --config is required"
  local base="${CONFIG##*/}"
  base="${base%%:*}"
  echo "${base%.py}"
}

# The run's --config and --bucket checked; prints the --config.<field>=<value> overrides after --, quoted.
check_run() {
  [[ -n "$CONFIG" ]] || die "--config is required (e.g. configs/llama3_8b_instruct.py:v5p-16)"
  [[ "$BUCKET" == gs://* ]] || die "--bucket must be a gs:// path, got '$BUCKET'"
  local arg
  for arg in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do
    [[ "$arg" == --config.* ]] || die "extra arguments after -- must be --config.<field>=<value>, got '$arg'"
    printf ' %s' "$(quote "$arg")"
  done
}

cmd_train() {
  local run_id out train overrides
  overrides="$(check_run)" || exit 2
  run_id="$(run_name)" || exit 2
  out="\$HOME/runs/$run_id"
  train="python3 -m simpo_jax.train --config $(quote "$CONFIG") --config.train.output_dir=$out"
  train+=" --config.checkpoint.directory=$BUCKET/$run_id/checkpoints"
  (( SLICES > 1 )) && train+=" --config.mesh.dcn_data=$SLICES"
  start_job "$run_id" "$out" "$train$overrides"
}

cmd_onpolicy() {
  local run_id out command overrides
  overrides="$(check_run)" || exit 2
  [[ "$STAGE" =~ ^(all|sample|score)$ ]] || die "--stage must be all, sample or score, got '$STAGE'"
  # One writer, whose shards come from and go back to the bucket: one slice (worker 0 holds process 0).
  (( SLICES == 1 )) || die "onpolicy runs on one slice (--num-slices 1): its output has one writer, worker 0"
  run_id="$(run_name)" || exit 2
  out="\$HOME/runs/$run_id"
  command="python3 -m simpo_jax.onpolicy --config $(quote "$CONFIG") --output $out --stage $STAGE"
  # Process 0 (worker 0) writes the shards: it starts from what an earlier run left in the bucket (if anything).
  on_workers 0 "mkdir -p $out && if gcloud storage ls $BUCKET/$run_id/output/ > /dev/null 2>&1; then \
gcloud storage rsync --recursive $BUCKET/$run_id/output $out; fi"
  # The shards go to the bucket every 5 minutes while it runs: a preempted slice loses at most that much.
  start_job "$run_id" "$out" "$command$overrides" "env SIMPO_JAX_SYNC_EVERY=300 "
}

# Run `command` on every worker through launch/worker.sh (detached, or with --wait in the foreground); `env`
# prefixes worker.sh with variable assignments.
start_job() {
  local run_id="$1" out="$2" command="$3" env="${4:-}"
  # launch/worker.sh loads the shared environment, runs the command and copies the run directory to the bucket.
  local job="${env}launch/worker.sh $out $BUCKET/$run_id/output $command" log="\$HOME/simpo_jax_${run_id//\//_}.log"
  [[ -z "$FETCH" ]] || (( WAIT )) || die "--fetch needs --wait"
  if (( ! WAIT )); then
    on_workers all "cd ~/$REMOTE_DIR && nohup $job > $log 2>&1 < /dev/null &"
    return
  fi
  local status=0
  on_workers all "set -o pipefail; cd ~/$REMOTE_DIR && $job 2>&1 | tee $log" &
  TRAIN_PID=$!
  # SIGTERM or Ctrl-C here (a sweep being stopped, say) must not leave the slice training on its own: ask every
  # worker's training to save and exit (as `stop` does), wait for it, then exit 143 as a terminated command does.
  trap 'echo "launch/tpu.sh: stopping the training on every worker (it saves a checkpoint)" >&2; cmd_stop; \
wait "$TRAIN_PID"; exit 143' TERM INT
  wait "$TRAIN_PID" || status=$?
  trap - TERM INT
  if [[ -n "$FETCH" ]]; then
    run mkdir -p "$FETCH"
    run gcloud storage rsync --recursive "$BUCKET/$run_id/output" "$FETCH" || status=$((status ? status : 1))
  fi
  exit "$status"
}

cmd_logs() {
  local run_id
  run_id="$(run_name)" || exit 2
  on_workers 0 "tail -n +1 -F \$HOME/simpo_jax_${run_id//\//_}.log"
}

cmd_stop() { on_workers all "pkill -TERM -f '^python3 -m simpo_jax[.](train|onpolicy)' || true"; }

cmd_status() {
  if (( QUEUED )); then
    run gcloud compute tpus queued-resources describe "$NAME" "${GCLOUD_SCOPE[@]}"
  else
    run gcloud compute tpus tpu-vm describe "$NAME" "${GCLOUD_SCOPE[@]}"
  fi
}

cmd_delete() {
  if (( QUEUED )); then
    run gcloud compute tpus queued-resources delete "$NAME" "${GCLOUD_SCOPE[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_SCOPE[@]}" --quiet
  fi
}

case "$COMMAND" in
  create|setup|train|onpolicy|logs|stop|status|delete) "cmd_$COMMAND" ;;
  *) die "unknown command '$COMMAND' (create, setup, train, onpolicy, logs, stop, status, delete)" ;;
esac
