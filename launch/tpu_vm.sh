#!/usr/bin/env bash
# Run t5g2 training on every worker of a Cloud TPU VM pod slice at once (or on every worker of
# every slice of a multi-slice queued resource): copy this checkout (or clone REPO_URL), set up a
# virtual environment with jax[tpu] on each worker, then start the same `python -m launch.train`
# command everywhere. See launch/README.md.
#
#   TPU_NAME=my-v5p-16 ZONE=us-east5-a launch/tpu_vm.sh \
#       --config configs/t5g2_270m.py --config.mesh.fsdp=-1 --workdir workdir/run1
#   QUEUED_RESOURCE=my-qr ZONE=us-east5-a launch/tpu_vm.sh --config ... --config.mesh.dcn_data=2 ...
#
# Arguments go to launch.train unchanged (a relative --workdir is under REMOTE_DIR on each worker;
# process 0, on worker 0, writes the metrics there).
#   TPU_NAME=... ZONE=... launch/tpu_vm.sh stop     # stop a DETACH=1 run on every worker
#   TPU_NAME=... ZONE=... launch/tpu_vm.sh logs     # last lines of a DETACH=1 run's logs
#
# Environment (nothing is hard-coded; the project is gcloud's configured one unless PROJECT is set):
#   TPU_NAME         the TPU VM pod slice                        } exactly one of these two
#   QUEUED_RESOURCE  a queued resource: all its nodes (slices)   }
#   ZONE             the zone (required)
#   PROJECT          Google Cloud project (default: `gcloud config get-value project`)
#   REPO_URL         git URL to clone on the workers; default: copy this checkout's tracked and
#                    untracked-but-not-ignored files with scp
#   GIT_REF          with REPO_URL: the branch, tag or commit to check out (default: remote HEAD)
#   REMOTE_DIR       the repository's directory on the workers, relative to $HOME (default: t5g2)
#   PYTHON           the workers' interpreter for the venv, Python >= 3.11 (default: python3)
#   JAX_TPU          the pip requirement that adds the TPU runtime (default: jax[tpu]; its version
#                    follows requirements-lock.txt)
#   SETUP=0          skip copying and installing (start again with the code already there)
#   DETACH=1         start in the background (nohup) and return; logs in REMOTE_DIR/train.log
#   DRY_RUN=1        print the gcloud commands instead of running them
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
REMOTE_DIR=${REMOTE_DIR:-t5g2}
PYTHON=${PYTHON:-python3}
JAX_TPU=${JAX_TPU:-jax[tpu]}
SETUP=${SETUP:-1}
DETACH=${DETACH:-0}
DRY_RUN=${DRY_RUN:-0}

mode=run
case "${1:-}" in
  -h|--help|"") usage ;;
  run) shift ;;
  stop|logs) mode=$1; shift ;;
esac
if [ "$mode" = run ] && [ $# -eq 0 ]; then usage; fi

if [ -n "${TPU_NAME:-}" ] && [ -n "${QUEUED_RESOURCE:-}" ]; then
  echo "error: set TPU_NAME or QUEUED_RESOURCE, not both" >&2; exit 2
fi
if [ -z "${TPU_NAME:-}${QUEUED_RESOURCE:-}" ] || [ -z "${ZONE:-}" ]; then
  echo "error: set TPU_NAME (or QUEUED_RESOURCE) and ZONE; run with --help for usage" >&2; exit 2
fi
if ! [[ "$REMOTE_DIR" =~ ^[A-Za-z0-9_][A-Za-z0-9_./-]*$ ]] || [[ "$REMOTE_DIR" == *..* ]]; then
  echo "error: REMOTE_DIR=$REMOTE_DIR must be a plain relative path under \$HOME" >&2; exit 2
fi

# gcloud_all ssh|scp ARGS...: the command on every worker (of every slice).
gcloud_all() {
  local verb=$1; shift
  local cmd
  if [ -n "${QUEUED_RESOURCE:-}" ]; then
    cmd=(gcloud compute tpus queued-resources "$verb")
    [ "$verb" = ssh ] && cmd+=("$QUEUED_RESOURCE")
    cmd+=(--node=all)
  else
    cmd=(gcloud compute tpus tpu-vm "$verb")
    [ "$verb" = ssh ] && cmd+=("$TPU_NAME")
  fi
  cmd+=(--worker=all --zone="$ZONE")
  [ -n "${PROJECT:-}" ] && cmd+=(--project="$PROJECT")
  cmd+=("$@")
  if [ "$DRY_RUN" = 1 ]; then
    printf '%q ' "${cmd[@]}"; echo
  else
    "${cmd[@]}"
  fi
}
target=${TPU_NAME:-${QUEUED_RESOURCE:-}}
remote_ssh() { gcloud_all ssh --command="$1"; }

if [ "$mode" = stop ]; then
  remote_ssh "cd ~/$REMOTE_DIR && if [ -f train.pid ]; then kill \$(cat train.pid) 2>/dev/null; rm -f train.pid; fi; true"
  exit 0
fi
if [ "$mode" = logs ]; then
  remote_ssh "echo \"== \$(hostname)\"; tail -n 20 ~/$REMOTE_DIR/train.log"
  exit 0
fi

case " $* " in
  *" --workdir"*) ;;
  *) echo "error: pass --workdir DIR (and --config FILE): they go to launch.train" >&2; exit 2 ;;
esac

if [ "$SETUP" = 1 ]; then
  if [ -n "${REPO_URL:-}" ]; then
    q_url=$(printf '%q' "$REPO_URL")
    q_ref=$(printf '%q' "${GIT_REF:-}")
    remote_ssh "set -e; cd ~; [ -d $REMOTE_DIR/.git ] || git clone -q $q_url $REMOTE_DIR; \
cd $REMOTE_DIR; ref=$q_ref; if [ -n \"\$ref\" ]; then git fetch -q origin \"\$ref\"; \
git checkout -q --detach FETCH_HEAD; else git fetch -q origin; git checkout -q --detach origin/HEAD; fi"
  else
    archive=$(mktemp -d)/t5g2.tar.gz
    trap 'rm -rf "$(dirname "$archive")"' EXIT
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
       | while IFS= read -r -d '' f; do [ ! -e "$f" ] || printf '%s\0' "$f"; done \
       | tar --null -T - -czf "$archive")
    gcloud_all scp "$archive" "$target:t5g2.tar.gz"
    remote_ssh "set -e; mkdir -p ~/$REMOTE_DIR && tar -xzf ~/t5g2.tar.gz -C ~/$REMOTE_DIR && rm ~/t5g2.tar.gz"
  fi
  q_jax=$(printf '%q' "$JAX_TPU")
  remote_ssh "set -e; cd ~/$REMOTE_DIR; \
$PYTHON -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
{ echo \"\$(hostname): $PYTHON is older than 3.11; set PYTHON=python3.11 (apt-get install python3.11-venv)\" >&2; exit 1; }; \
[ -x .venv/bin/python ] || $PYTHON -m venv .venv; \
.venv/bin/python -m pip install -q --upgrade pip; \
.venv/bin/python -m pip install -q -r requirements.txt $q_jax -c requirements-lock.txt"
fi

# Every worker runs the same command. T5G2_CLUSTER=tpu: the pod slice's topology (and, for a
# multi-slice queued resource, MEGASCALE_*) is in the VM metadata, which JAX reads itself.
train_args=$(printf ' %q' "$@")
run="cd ~/$REMOTE_DIR && export T5G2_CLUSTER=tpu"
if [ "$DETACH" = 1 ]; then
  remote_ssh "$run && nohup .venv/bin/python -m launch.train$train_args > train.log 2>&1 < /dev/null & \
echo \$! > ~/$REMOTE_DIR/train.pid; echo \"\$(hostname): started, pid \$!\""
  echo "started; follow with: $0 logs   (stop with: $0 stop)"
else
  remote_ssh "$run && exec .venv/bin/python -m launch.train$train_args"
fi
