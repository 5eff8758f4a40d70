#!/usr/bin/env bash
# Train on GKE through XPK: (optionally) build and push the image, then one `xpk workload create`.
# Every pod runs `mod-jax train --distributed` (jax finds the other hosts on GKE by itself); after
# an eviction or maintenance event XPK restarts the workload (--max-restarts) and the run resumes
# from its last checkpoint in the gs:// workdir (SIGTERM saves one; GKE's grace period is 30 s).
#
#   bash launch/xpk.sh --cluster C --workload W --docker-image IMG
#        (--tpu-type v5p-128 [--num-slices N] | --device-type h100-80gb-8 --num-nodes N)
#        [--max-restarts 3] [--project P] [--zone Z] [--build] [--dry-run] -- <mod-jax train flags>
#
# --build: docker build launch/Dockerfile (ACCELERATOR=tpu or gpu, from the device) and push IMG.
# --dry-run: print the exact commands (shell-quoted, copy-pasteable) and touch no network.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CLUSTER="" WORKLOAD="" IMAGE="" TPU="" DEVICE="" SLICES=1 NODES=1 RESTARTS=3 PROJECT="" ZONE=""
BUILD=0 DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cluster) CLUSTER=$2; shift 2 ;;
    --workload) WORKLOAD=$2; shift 2 ;;
    --docker-image) IMAGE=$2; shift 2 ;;
    --tpu-type) TPU=$2; shift 2 ;;
    --device-type) DEVICE=$2; shift 2 ;;
    --num-slices) SLICES=$2; shift 2 ;;
    --num-nodes) NODES=$2; shift 2 ;;
    --max-restarts) RESTARTS=$2; shift 2 ;;
    --project) PROJECT=$2; shift 2 ;;
    --zone) ZONE=$2; shift 2 ;;
    --build) BUILD=1; shift ;;
    --dry-run) DRY=1; shift ;;
    --) shift; break ;;
    *) echo "xpk.sh: unknown argument '$1' (put mod-jax train flags after --)" >&2; exit 2 ;;
  esac
done
if [ -z "$CLUSTER" ] || [ -z "$WORKLOAD" ] || [ -z "$IMAGE" ]; then
  echo "xpk.sh: --cluster, --workload and --docker-image are required" >&2; exit 2
fi
if { [ -z "$TPU" ] && [ -z "$DEVICE" ]; } || { [ -n "$TPU" ] && [ -n "$DEVICE" ]; }; then
  echo "xpk.sh: give exactly one of --tpu-type (TPU slices) or --device-type (GPU nodes)" >&2; exit 2
fi

run() {  # print (dry run) or execute one command, quoted
  if [ "$DRY" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

printf -v TRAIN '%q ' mod-jax train --distributed "$@"
CMD=(xpk workload create --cluster "$CLUSTER" --workload "$WORKLOAD" --docker-image "$IMAGE")
if [ -n "$TPU" ]; then
  TOPO=$(python3 "$HERE/tpu_topology.py" "$TPU")  # hosts=H chips=C topology=T
  HOSTS=$(sed -E 's/hosts=([0-9]+).*/\1/' <<<"$TOPO")
  echo "# $TPU x $SLICES slice(s): $TOPO per slice -> $((HOSTS * SLICES)) pods, one mod-jax process each"
  CMD+=(--tpu-type "$TPU" --num-slices "$SLICES")
  ACCEL=tpu
else
  echo "# $DEVICE x $NODES node(s) -> $NODES pods, one mod-jax process each (all GPUs of a node)"
  CMD+=(--device-type "$DEVICE" --num-nodes "$NODES")
  ACCEL=gpu
fi
CMD+=(--command "${TRAIN% }" --max-restarts "$RESTARTS")
[ -n "$PROJECT" ] && CMD+=(--project "$PROJECT")
[ -n "$ZONE" ] && CMD+=(--zone "$ZONE")
if [ "$BUILD" = 1 ]; then
  run docker build -f "$HERE/Dockerfile" --build-arg "ACCELERATOR=$ACCEL" -t "$IMAGE" "$HERE/.."
  run docker push "$IMAGE"
fi
run "${CMD[@]}"
