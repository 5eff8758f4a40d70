#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create it (or a queued resource), copy and install mod_jax on
# every worker, then run `mod-jax train --distributed` on every worker (one ssh per worker, as
# MaxText does; jax finds the other hosts from the TPU metadata).
#
#   bash launch/tpu_vm.sh --name NAME --zone ZONE --tpu-type v5p-128 [--project P]
#        [--runtime v2-alpha-tpuv5] [--queued --source gs://B/mod_jax.tar.gz [--spot]] [--dry-run]
#        -- <mod-jax train flags>
#
#   e.g. bash launch/tpu_vm.sh --name mod8b --zone us-east5-a --tpu-type v5p-128 --dry-run -- \
#          --config configs/videollm_mod_llama3_8b.py --workdir gs://BUCKET/runs/mod8b
#
# --queued: for long, preemptible runs: a queued resource whose startup script installs and runs
#   the job on every worker when the slice comes up (and again after a maintenance restart; the
#   run resumes from its last checkpoint in the gs:// workdir).
# --dry-run: print the exact commands (shell-quoted, copy-pasteable) and touch no network.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NAME="" ZONE="" TYPE="" PROJECT="" RUNTIME="" SOURCE="" QUEUED=0 SPOT=0 DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --name) NAME=$2; shift 2 ;;
    --zone) ZONE=$2; shift 2 ;;
    --tpu-type) TYPE=$2; shift 2 ;;
    --project) PROJECT=$2; shift 2 ;;
    --runtime) RUNTIME=$2; shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --source) SOURCE=$2; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --dry-run) DRY=1; shift ;;
    --) shift; break ;;
    *) echo "tpu_vm.sh: unknown argument '$1' (put mod-jax train flags after --)" >&2; exit 2 ;;
  esac
done
TRAIN_ARGS=("$@")
if [ -z "$NAME" ] || [ -z "$ZONE" ] || [ -z "$TYPE" ]; then
  echo "tpu_vm.sh: --name, --zone and --tpu-type are required" >&2; exit 2
fi
TOPO=$(python3 "$HERE/tpu_topology.py" "$TYPE")  # hosts=H chips=C topology=T
HOSTS=$(sed -E 's/hosts=([0-9]+).*/\1/' <<<"$TOPO")
case "$TYPE" in
  v5p-*) RUNTIME=${RUNTIME:-v2-alpha-tpuv5} ;;
  v5litepod-*) RUNTIME=${RUNTIME:-v2-alpha-tpuv5-lite} ;;
  v6e-*) RUNTIME=${RUNTIME:-v2-alpha-tpuv6e} ;;
  *) RUNTIME=${RUNTIME:-tpu-ubuntu2204-base} ;;
esac
GCLOUD=(gcloud compute tpus)
LOC=(--zone "$ZONE"); [ -n "$PROJECT" ] && LOC+=(--project "$PROJECT")

# The command every worker runs (a single shell string for ssh / the startup script).
printf -v TRAIN '%q ' mod-jax train --distributed "${TRAIN_ARGS[@]}"
INSTALL='mkdir -p ~/mod_jax && tar xzf ~/mod_jax.tar.gz -C ~/mod_jax && pip install -q -e "$HOME/mod_jax[tpu,cloud]"'
RUN="cd ~/mod_jax && ${TRAIN% }"

run() {  # print (dry run) or execute one command, quoted
  if [ "$DRY" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

echo "# $TYPE: $TOPO -> $HOSTS worker(s), one mod-jax process each"
if [ "$QUEUED" = 1 ]; then
  case "$SOURCE" in gs://*) ;; *) echo "tpu_vm.sh: --queued needs --source gs://BUCKET/mod_jax.tar.gz" >&2; exit 2 ;; esac
  run git -C "$HERE/.." archive --format=tar.gz -o /tmp/mod_jax.tar.gz HEAD
  run gcloud storage cp /tmp/mod_jax.tar.gz "$SOURCE"
  SCRIPT=${TMPDIR:-/tmp}/mod_jax_startup_$NAME.sh
  STARTUP=$(printf '#!/bin/bash\n# runs on every worker at boot\ngcloud storage cp %q ~/mod_jax.tar.gz\n%s\n%s\n' \
    "$SOURCE" "$INSTALL" "$RUN")
  if [ "$DRY" = 1 ]; then echo "# $SCRIPT:"; sed 's/^/#   /' <<<"$STARTUP"; else echo "$STARTUP" >"$SCRIPT"; fi
  EXTRA=(); [ "$SPOT" = 1 ] && EXTRA+=(--spot)
  run "${GCLOUD[@]}" queued-resources create "$NAME" --node-id "$NAME" "${LOC[@]}" \
    --accelerator-type "$TYPE" --runtime-version "$RUNTIME" \
    --metadata-from-file "startup-script=$SCRIPT" "${EXTRA[@]}"
  exit 0
fi
run "${GCLOUD[@]}" tpu-vm create "$NAME" "${LOC[@]}" --accelerator-type "$TYPE" --version "$RUNTIME"
run git -C "$HERE/.." archive --format=tar.gz -o /tmp/mod_jax.tar.gz HEAD
for ((w = 0; w < HOSTS; w++)); do
  run "${GCLOUD[@]}" tpu-vm scp /tmp/mod_jax.tar.gz "$NAME:~/" "${LOC[@]}" --worker="$w"
  run "${GCLOUD[@]}" tpu-vm ssh "$NAME" "${LOC[@]}" --worker="$w" --command "$INSTALL"
done
for ((w = 0; w < HOSTS; w++)); do  # all workers at once: jax.distributed waits for every host
  if [ "$DRY" = 1 ]; then
    run "${GCLOUD[@]}" tpu-vm ssh "$NAME" "${LOC[@]}" --worker="$w" --command "$RUN"
  else
    run "${GCLOUD[@]}" tpu-vm ssh "$NAME" "${LOC[@]}" --worker="$w" --command "$RUN" &
  fi
done
[ "$DRY" = 1 ] || wait
