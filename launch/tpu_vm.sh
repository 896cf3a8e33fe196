#!/usr/bin/env bash
# Run t5g2 training on every worker of a Cloud TPU VM pod slice (or of every slice of a multi-slice
# queued resource): create the slice, copy this checkout, build a Python 3.11 environment with
# jax[tpu] on each worker (uv, from PyPI), stage inputs, start the same `python -m launch.train`
# everywhere, gather logs, stop with a checkpoint, recreate after a preemption (launch/README.md).
#
#   launch/tpu_vm.sh create                     # the queued resource / TPU VM (ACCELERATOR_TYPE)
#   launch/tpu_vm.sh [run] --config configs/t5g2_270m.py --workdir gs://BUCKET/runs/a [--config.x=y]
#   launch/tpu_vm.sh stage                      # copy STAGE to every worker (SETUP=1 runs do it)
#   launch/tpu_vm.sh logs [DIR]                 # last LOG_LINES lines of every worker, named;
#                                               #   or copy each worker's log (via LOG_URL) to DIR
#   launch/tpu_vm.sh stop                       # SIGTERM to Python on every worker, wait for its
#                                               #   checkpoint, report each worker's exit status
#   launch/tpu_vm.sh status                     # the slice's state and each worker's run
#   launch/tpu_vm.sh resume --config ... --workdir ...  # after maintenance or a preemption: start
#                                               #   again, recreating the slice first if it is gone
#   launch/tpu_vm.sh delete
#
# Arguments after the mode go to launch.train unchanged. --workdir must be a gs:// URL or an
# absolute path on a file system every worker mounts (each worker writes its checkpoint shards
# there); a relative one would land on each worker's own disk and is refused
# (ALLOW_LOCAL_WORKDIR=1: a single-host slice). Relative paths in other arguments (e.g. a staged
# checkpoint) are under REMOTE_DIR on each worker, where training runs. Remote commands run in the
# workers' login shell, bash.
#
# Environment (nothing is hard-coded; the project is gcloud's configured one unless PROJECT is set):
#   TPU_NAME         a TPU VM (pod slice)                           } exactly one of these two
#   QUEUED_RESOURCE  a queued resource: all its nodes (slices)      }
#   ZONE             the zone (required)
#   PROJECT          Google Cloud project (default: gcloud's)
#  create / resume:
#   ACCELERATOR_TYPE e.g. v5p-32 (required)
#   RUNTIME_VERSION  the TPU software version (default from ACCELERATOR_TYPE: v5p v2-alpha-tpuv5,
#                    v5litepod v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e, v2-v4 tpu-ubuntu2204-base)
#   NODE_COUNT       slices of a multi-slice queued resource (default 1)
#   PROVISIONING     on-demand (default), spot or reserved
#   AUTOCHECKPOINT=1 (default) create with --autocheckpoint-enabled (gcloud alpha): before a
#                    maintenance event Cloud TPU sends SIGTERM to the process using the TPU, waits
#                    up to 5 minutes, so training saves a checkpoint; 0: no SIGTERM, maintenance
#                    kills the run and it resumes from its last periodic checkpoint
#   SERVICE_ACCOUNT  the workers' service account (default: Compute Engine's default one)
#   SCOPES           its OAuth scopes (default: https://www.googleapis.com/auth/cloud-platform;
#                    IAM roles on the bucket decide what it may do)
#   VALID_UNTIL      queued resource: give up if not provisioned within this duration (e.g. 6h)
#   WAIT=1           (default) create waits until the queued resource is ACTIVE (POLL_S, default 30)
#  run:
#   SETUP=1          (default) copy the code (or clone REPO_URL at GIT_REF), build the environment
#                    and stage inputs; SETUP=0 starts again with what is already on the workers
#   DETACH=1         start in the background and return; else follow every worker's log and, on
#                    Ctrl-C or SIGTERM, stop the run with a checkpoint (as `stop` does)
#   STAGE            "SOURCE:DEST ..." copied to every worker before the run: SOURCE a gs:// prefix
#                    (synced on each worker with `gcloud storage rsync --recursive`), a local
#                    directory or a local file; DEST relative to REMOTE_DIR, or absolute
#   PASS_ENV         names of local variables to set on the workers when set here (default:
#                    LIBTPU_INIT_ARGS XLA_FLAGS TPU_STDERR_LOG_LEVEL TPU_MIN_LOG_LEVEL
#                    TF_CPP_MIN_LOG_LEVEL JAX_COMPILATION_CACHE_DIR); add names to pass more
#   LOG_URL          gs:// prefix (or a path on a shared mount) that each worker copies its log to
#                    when its run ends, and on `logs DIR`; logs then outlive the workers' disks
#   REMOTE_DIR       the repository's directory on the workers, relative to $HOME (default: t5g2)
#   REPO_URL, GIT_REF  clone this git URL at this ref instead of copying this checkout
#   PYTHON_VERSION   the Python uv installs (default 3.11); UV: uv's requirement (uv==0.13.8)
#   PYTHON           use this interpreter (>= 3.11, already on the workers) with venv + pip, no uv
#   JAX_TPU          the TPU runtime requirement (default jax[tpu], version from requirements-lock)
#   EXTRA_PACKAGES   more requirements to install beside requirements.txt (default: none)
#  stop / logs:
#   STOP_TIMEOUT     seconds each worker waits for Python to exit after SIGTERM (default 600)
#   LOG_LINES        lines per worker for `logs` (default 50)
#   DRY_RUN=1        print the gcloud commands, one per line, instead of running them
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}
die() { echo "error: $*" >&2; exit 2; }

ROOT=$(cd "$(dirname "$0")/.." && pwd)
REMOTE_DIR=${REMOTE_DIR:-t5g2}
SETUP_GIVEN=${SETUP:-}
SETUP=${SETUP:-1}
DETACH=${DETACH:-0}
DRY_RUN=${DRY_RUN:-0}
AUTOCHECKPOINT=${AUTOCHECKPOINT:-1}
PROVISIONING=${PROVISIONING:-on-demand}
NODE_COUNT=${NODE_COUNT:-1}
SCOPES=${SCOPES:-https://www.googleapis.com/auth/cloud-platform}
WAIT=${WAIT:-1}
POLL_S=${POLL_S:-30}
STOP_TIMEOUT=${STOP_TIMEOUT:-600}
LOG_LINES=${LOG_LINES:-50}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
UV=${UV:-uv==0.13.8}
JAX_TPU=${JAX_TPU:-jax[tpu]}
EXTRA_PACKAGES=${EXTRA_PACKAGES:-}
PASS_ENV=${PASS_ENV:-LIBTPU_INIT_ARGS XLA_FLAGS TPU_STDERR_LOG_LEVEL TPU_MIN_LOG_LEVEL TF_CPP_MIN_LOG_LEVEL JAX_COMPILATION_CACHE_DIR}

mode=run
case "${1:-}" in
  -h|--help|"") usage ;;
  run|resume) mode=$1; shift ;;
  create|delete|stage|stop|logs|status) mode=$1; shift ;;
  -*) ;;
  *) die "unknown mode '$1': one of run, create, delete, stage, stop, logs, status, resume (or --help)" ;;
esac
if { [ "$mode" = run ] || [ "$mode" = resume ]; } && [ $# -eq 0 ]; then usage; fi

if [ -n "${TPU_NAME:-}" ] && [ -n "${QUEUED_RESOURCE:-}" ]; then
  die "set TPU_NAME or QUEUED_RESOURCE, not both"
fi
if [ -z "${TPU_NAME:-}${QUEUED_RESOURCE:-}" ] || [ -z "${ZONE:-}" ]; then
  die "set TPU_NAME (or QUEUED_RESOURCE) and ZONE; run with --help for usage"
fi
if ! [[ "$REMOTE_DIR" =~ ^[A-Za-z0-9_][A-Za-z0-9_./-]*$ ]] || [[ "$REMOTE_DIR" == *..* ]]; then
  die "REMOTE_DIR=$REMOTE_DIR must be a plain relative path under \$HOME"
fi
for n in STOP_TIMEOUT LOG_LINES NODE_COUNT POLL_S; do
  [[ "${!n}" =~ ^[0-9]+$ ]] || die "$n=${!n} must be a whole number"
done
target=${TPU_NAME:-${QUEUED_RESOURCE:-}}
q() { printf '%q' "$1"; }
work=$(mktemp -d)  # local archives on their way to the workers
trap 'rm -rf "$work"' EXIT

# gcloud_run ARGS...: run gcloud (print it, quoted, with DRY_RUN=1).
gcloud_run() {
  local cmd=(gcloud "$@")
  [ -n "${PROJECT:-}" ] && cmd+=(--project="$PROJECT")
  if [ "$DRY_RUN" = 1 ]; then
    printf '%q ' "${cmd[@]}"; echo
  else
    "${cmd[@]}"
  fi
}

# gcloud_all ssh|scp ARGS...: the command on every worker (of every slice).
gcloud_all() {
  local verb=$1; shift
  local cmd
  if [ -n "${QUEUED_RESOURCE:-}" ]; then
    cmd=(compute tpus queued-resources "$verb")
    [ "$verb" = ssh ] && cmd+=("$QUEUED_RESOURCE")
    cmd+=(--node=all)
  else
    cmd=(compute tpus tpu-vm "$verb")
    [ "$verb" = ssh ] && cmd+=("$TPU_NAME")
  fi
  gcloud_run "${cmd[@]}" --worker=all --zone="$ZONE" "$@"
}
remote_ssh() { gcloud_all ssh --command="$1"; }

# The run's files on each worker (its own disk), under ~/REMOTE_DIR: .run/pid (the pid of Python
# itself: the subshell that writes it becomes Python by exec), .run/exit (Python's exit status,
# written by the wrapper that waited for it), .run/boot (the kernel's boot id then: after a reboot
# the pid may belong to another process), logs/train-<hostname>.log (appended to by every start).
home="~/$REMOTE_DIR"
boot_id=/proc/sys/kernel/random/boot_id
alive="alive() { [ -s .run/pid ] && [ \"\$(cat .run/boot 2>/dev/null)\" = \"\$(cat $boot_id)\" ] \
&& kill -0 \$(cat .run/pid) 2>/dev/null; }"
in_dir="cd $home && h=\$(hostname) && log=logs/train-\$h.log"
# The worker's log to LOG_URL (gs:// or a shared path), if set; run from ~/REMOTE_DIR.
upload_log='if [ -n "${T5G2_LOG_URL:-}" ]; then f=logs/train-$(hostname).log; case $T5G2_LOG_URL in gs://*) gcloud storage cp "$f" "$T5G2_LOG_URL/" ;; *) mkdir -p "$T5G2_LOG_URL" && cp "$f" "$T5G2_LOG_URL/" ;; esac; fi'

for name in $PASS_ENV; do
  [[ "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "PASS_ENV: '$name' is not a variable name"
done
# Variables set on the workers: T5G2_CLUSTER=tpu (the slice's topology and, for multi-slice,
# MEGASCALE_* come from the VM metadata, which JAX reads itself), PASS_ENV, LOG_URL.
env_exports() {
  local out="export T5G2_CLUSTER=tpu" name
  for name in $PASS_ENV; do
    if [ -n "${!name+set}" ]; then out+="; export $name=$(q "${!name}")"; fi
  done
  [ -n "${LOG_URL:-}" ] && out+="; export T5G2_LOG_URL=$(q "${LOG_URL%/}")"
  printf '%s' "$out"
}

stop_workers() {
  local report="s=\$(cat .run/exit); case \$s in 143) what='stopped after saving a checkpoint';; \
0) what='finished';; *) what=\"failed: see $home/logs/train-\$h.log\";; esac; \
echo \"\$h: exited with status \$s (\$what)\"; [ \$s = 0 ] || [ \$s = 143 ]"
  remote_ssh "cd $home 2>/dev/null || { echo \"\$(hostname): no $home\"; exit 0; }; h=\$(hostname); $alive; \
if [ -f .run/exit ]; then $report; elif alive; then pid=\$(cat .run/pid); kill -TERM \$pid; \
echo \"\$h: sent SIGTERM to pid \$pid; waiting up to ${STOP_TIMEOUT}s for its checkpoint\"; \
t=0; gone=0; while [ ! -f .run/exit ] && [ \$t -lt $((STOP_TIMEOUT * 10)) ] && [ \$gone -lt 30 ]; do \
alive || gone=\$((gone + 1)); sleep 0.1; t=\$((t + 1)); done; \
if [ -f .run/exit ]; then $report; elif alive; then echo \"\$h: pid \$pid still running after \
${STOP_TIMEOUT}s (a checkpoint may still be writing): run stop again, or kill -KILL \$pid\" >&2; exit 1; \
else echo \"\$h: pid \$pid ended without an exit status\" >&2; exit 1; fi; \
elif [ -s .run/pid ]; then echo \"\$h: not running and no exit status recorded (the VM restarted?)\"; \
else echo \"\$h: no run recorded\"; fi"
}

queued_state() {  # the queued resource's (or TPU VM's) state, e.g. ACTIVE, SUSPENDED, READY, PREEMPTED
  if [ -n "${QUEUED_RESOURCE:-}" ]; then
    gcloud_run compute tpus queued-resources describe "$QUEUED_RESOURCE" --zone="$ZONE" \
      --format='value(state.state)'
  else
    gcloud_run compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" --format='value(state)'
  fi
}

create() {
  [ -n "${ACCELERATOR_TYPE:-}" ] || die "set ACCELERATOR_TYPE (e.g. v5p-32) to create $target"
  local version=${RUNTIME_VERSION:-}
  if [ -z "$version" ]; then
    case "$ACCELERATOR_TYPE" in
      v5p-*) version=v2-alpha-tpuv5 ;;
      v5litepod-*) version=v2-alpha-tpuv5-lite ;;
      v6e-*) version=v2-alpha-tpuv6e ;;
      v2-*|v3-*|v4-*) version=tpu-ubuntu2204-base ;;
      *) die "set RUNTIME_VERSION for ACCELERATOR_TYPE=$ACCELERATOR_TYPE (https://cloud.google.com/tpu/docs/runtimes)" ;;
    esac
  fi
  local track=() flags=(--zone="$ZONE" --accelerator-type="$ACCELERATOR_TYPE")
  if [ "$AUTOCHECKPOINT" = 1 ]; then
    track=(alpha)  # --autocheckpoint-enabled exists only in the alpha track
    flags+=(--autocheckpoint-enabled)
  fi
  case "$PROVISIONING" in
    on-demand) ;;
    spot) flags+=(--spot) ;;
    reserved) flags+=(--reserved) ;;
    *) die "PROVISIONING=$PROVISIONING: one of on-demand, spot, reserved" ;;
  esac
  [ -n "${SERVICE_ACCOUNT:-}" ] && flags+=(--service-account="$SERVICE_ACCOUNT")
  flags+=(--scopes="$SCOPES")
  if [ -n "${QUEUED_RESOURCE:-}" ]; then
    flags+=(--runtime-version="$version")
    if [ "$NODE_COUNT" -gt 1 ]; then
      flags+=(--node-count="$NODE_COUNT" --node-prefix="$QUEUED_RESOURCE")
    else
      flags+=(--node-id="$QUEUED_RESOURCE")
    fi
    [ -n "${VALID_UNTIL:-}" ] && flags+=(--valid-until-duration="$VALID_UNTIL")
    gcloud_run "${track[@]}" compute tpus queued-resources create "$QUEUED_RESOURCE" "${flags[@]}"
    [ "$WAIT" = 1 ] && wait_active
  else
    [ "$NODE_COUNT" -gt 1 ] && die "NODE_COUNT=$NODE_COUNT needs QUEUED_RESOURCE (multi-slice)"
    [ -n "${VALID_UNTIL:-}" ] && die "VALID_UNTIL needs QUEUED_RESOURCE"
    gcloud_run "${track[@]}" compute tpus tpu-vm create "$TPU_NAME" "${flags[@]}" --version="$version"
  fi
  return 0
}

wait_active() {  # poll the queued resource until ACTIVE; FAILED or SUSPENDED end the wait
  if [ "$DRY_RUN" = 1 ]; then queued_state; return; fi
  local state last=""
  while true; do
    state=$(queued_state) || state="unknown (describe failed)"
    [ "$state" != "$last" ] && echo "$(date -u +%H:%M:%SZ) $QUEUED_RESOURCE: $state" >&2
    last=$state
    case "$state" in
      ACTIVE) return 0 ;;
      FAILED|SUSPENDED) die "$QUEUED_RESOURCE is $state: see gcloud compute tpus queued-resources describe $QUEUED_RESOURCE --zone=$ZONE" ;;
    esac
    sleep "$POLL_S"
  done
}

delete() {
  if [ -n "${QUEUED_RESOURCE:-}" ]; then  # --force: its TPU VMs too
    gcloud_run compute tpus queued-resources delete "$QUEUED_RESOURCE" --zone="$ZONE" --force --quiet
  else
    gcloud_run compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet
  fi
}

stage() {  # STAGE="SOURCE:DEST ...": each to every worker
  local item src dest
  for item in ${STAGE:-}; do
    src=${item%:*}; dest=${item##*:}
    if [[ "$item" != *:* ]] || [ -z "$src" ] || [ "$src" = gs ] || [[ "$dest" == //* ]]; then
      die "STAGE item '$item' must be SOURCE:DEST (e.g. gs://bucket/gemma-3-270m:gemma-3-270m)"
    fi
    [[ "$dest" =~ ^[A-Za-z0-9_./-]+$ ]] || die "STAGE destination '$dest' must be a plain path"
    local qd; qd=$(q "$dest")
    if [[ "$src" == gs://* ]]; then
      remote_ssh "set -e; mkdir -p $home && cd $home && mkdir -p $qd && gcloud storage rsync --recursive $(q "$src") $qd"
    elif [ -d "$src" ]; then
      [ "$DRY_RUN" = 1 ] || tar -C "$src" -cf "$work/stage.tar" .
      gcloud_all scp "$work/stage.tar" "$target:t5g2-stage.tar"
      remote_ssh "set -e; mkdir -p $home && cd $home && mkdir -p $qd && tar -xf ~/t5g2-stage.tar -C $qd && rm ~/t5g2-stage.tar"
    elif [ -f "$src" ]; then
      gcloud_all scp "$src" "$target:t5g2-stage.file"
      remote_ssh "set -e; mkdir -p $home && cd $home && mkdir -p \"\$(dirname $qd)\" && mv ~/t5g2-stage.file $qd"
    else
      die "STAGE source '$src' is neither a gs:// URL nor a local file or directory"
    fi
  done
}

copy_code() {
  if [ -n "${REPO_URL:-}" ]; then
    remote_ssh "set -e; cd ~; [ -d $REMOTE_DIR/.git ] || git clone -q $(q "$REPO_URL") $REMOTE_DIR; \
cd $REMOTE_DIR; ref=$(q "${GIT_REF:-}"); if [ -n \"\$ref\" ]; then git fetch -q origin \"\$ref\"; \
git checkout -q --detach FETCH_HEAD; else git fetch -q origin; git checkout -q --detach origin/HEAD; fi"
  else
    if [ "$DRY_RUN" != 1 ]; then
      (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
         | while IFS= read -r -d '' f; do [ ! -e "$f" ] || printf '%s\0' "$f"; done \
         | tar --null -T - -czf "$work/t5g2.tar.gz")
    fi
    gcloud_all scp "$work/t5g2.tar.gz" "$target:t5g2.tar.gz"
    remote_ssh "set -e; mkdir -p $home && tar -xzf ~/t5g2.tar.gz -C $home && rm ~/t5g2.tar.gz"
  fi
}

# The environment: uv (from PyPI, into ~/.local) makes a venv with a uv-managed CPython
# PYTHON_VERSION (TPU VM images ship an older python3) and installs the requirements with the lock
# file as constraints; with PYTHON set, that interpreter's venv and pip instead.
setup_env() {
  local pkgs="$(q "$JAX_TPU")" p
  for p in $EXTRA_PACKAGES; do pkgs+=" $(q "$p")"; done
  local check="-c 'import sys; sys.exit(sys.version_info < (3, 11))'"
  if [ -n "${PYTHON:-}" ]; then
    local py; py=$(q "$PYTHON")
    remote_ssh "set -e; cd $home; $py $check || { echo \"\$(hostname): $py is older than 3.11 \
(unset PYTHON to let uv install Python $PYTHON_VERSION)\" >&2; exit 1; }; [ -x .venv/bin/python ] || $py -m venv .venv; \
.venv/bin/python -m pip install -q --upgrade pip; \
.venv/bin/python -m pip install -q -r requirements.txt $pkgs -c requirements-lock.txt"
  else
    local uv; uv=$(q "$UV")
    remote_ssh "set -e; cd $home; python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install -q --user $uv \
|| python3 -m pip install -q --user --break-system-packages $uv; \
.venv/bin/python $check 2>/dev/null || { rm -rf .venv; \
python3 -m uv venv -q --python $(q "$PYTHON_VERSION") --python-preference only-managed .venv; }; \
python3 -m uv pip install -q --python .venv/bin/python -r requirements.txt $pkgs -c requirements-lock.txt"
  fi
}

check_workdir() {  # the --workdir argument must be shared by every worker
  local arg prev="" workdir=""
  for arg in "$@"; do
    case "$arg" in --workdir=*) workdir=${arg#--workdir=} ;; esac
    [ "$prev" = --workdir ] && workdir=$arg
    prev=$arg
  done
  [ -n "$workdir" ] || die "pass --workdir (a gs:// URL or a shared absolute path) and --config: they go to launch.train"
  case "$workdir" in
    gs://*) ;;
    /*) echo "note: --workdir $workdir must be one file system mounted on every worker; a disk of" \
          "its own on each is refused at start by launch.train" >&2 ;;
    *) [ "${ALLOW_LOCAL_WORKDIR:-0}" = 1 ] || die "--workdir $workdir is relative: on a multi-host slice\
 each worker would write its checkpoint shards to its own disk. Use a gs:// URL (gs://BUCKET/runs/NAME)\
 or an absolute path on a shared mount (ALLOW_LOCAL_WORKDIR=1: a single-host slice)" ;;
  esac
}

start() {  # start launch.train in the background on every worker; returns once each has its pid
  local args; args=$(printf ' %q' "$@")
  remote_ssh "$in_dir && mkdir -p logs .run && $alive; if [ ! -f .run/exit ] && alive; then \
echo \"\$h: a run is still going (pid \$(cat .run/pid)): stop it first\" >&2; exit 1; fi; \
rm -f .run/pid .run/exit; cat $boot_id > .run/boot; $(env_exports); \
echo \"=== \$(date -u +%Y-%m-%dT%H:%M:%SZ) \$h: launch.train starts\" >> \$log; \
wc -c < \$log > .run/offset; \
nohup setsid bash -c '( echo \$BASHPID > .run/pid; exec .venv/bin/python -m launch.train \"\$@\" ); \
echo \$? > .run/exit.tmp; mv .run/exit.tmp .run/exit; $upload_log' t5g2-train$args >> \$log 2>&1 < /dev/null & \
i=0; while [ ! -s .run/pid ] && [ \$i -lt 100 ]; do sleep 0.1; i=\$((i + 1)); done; \
[ -s .run/pid ] || { echo \"\$h: launch.train did not start: see $home/\$log\" >&2; exit 1; }; \
echo \"\$h: started pid \$(cat .run/pid), log $home/\$log\""
}

follow() {  # every worker's log from this start, named, until Python exits; exit with its status
  remote_ssh "$in_dir && pid=\$(cat .run/pid) && \
tail -c +\$((\$(cat .run/offset) + 1)) --pid=\$pid -F \$log | sed -u \"s/^/\$h| /\"; \
i=0; while [ ! -f .run/exit ] && [ \$i -lt 50 ]; do sleep 0.1; i=\$((i + 1)); done; \
exit \$(cat .run/exit 2>/dev/null || echo 1)"
}

run() {
  check_workdir "$@"
  if [ "$SETUP" = 1 ]; then
    copy_code
    setup_env
    stage
  fi
  start "$@"
  if [ "$DETACH" = 1 ]; then
    echo "started; follow with: $0 logs   stop with: $0 stop" >&2
    return 0
  fi
  # Ctrl-C or SIGTERM here: SIGTERM to Python on every worker and wait for its checkpoint. follow
  # runs in the background so that `wait` returns as soon as a signal arrives.
  local follower
  trap 'trap - INT TERM; echo "stopping the run on every worker (a checkpoint first)" >&2; \
kill "$follower" 2>/dev/null || true; stop_workers; exit 143' INT TERM
  follow &
  follower=$!
  wait "$follower"
}

case "$mode" in
  create) create ;;
  delete) delete ;;
  stage) stage ;;
  stop) stop_workers ;;
  status)
    queued_state
    remote_ssh "cd $home 2>/dev/null && h=\$(hostname) || { echo \"\$(hostname): no $home\"; exit 0; }; \
if [ ! -s .run/pid ]; then echo \"\$h: no run recorded\"; elif [ -f .run/exit ]; then \
echo \"\$h: exited with status \$(cat .run/exit)\"; elif $alive; alive; then \
echo \"\$h: running, pid \$(cat .run/pid)\"; else echo \"\$h: not running, no exit status (the VM restarted?)\"; fi" ;;
  logs)
    if [ $# -eq 0 ]; then
      remote_ssh "$in_dir && tail -n $LOG_LINES \$log | sed \"s/^/\$h| /\""
    else
      [ -n "${LOG_URL:-}" ] || die "logs DIR copies the logs through LOG_URL (a gs:// prefix or a shared path): set it"
      remote_ssh "$in_dir && $(env_exports) && $upload_log"
      [ "$DRY_RUN" = 1 ] || mkdir -p "$1"
      case "$LOG_URL" in
        gs://*) gcloud_run storage rsync --recursive "${LOG_URL%/}" "$1" ;;
        *) if [ -n "${QUEUED_RESOURCE:-}" ]; then
             gcloud_run compute tpus queued-resources scp --recurse "$target:${LOG_URL%/}" "$1" --zone="$ZONE"
           else
             gcloud_run compute tpus tpu-vm scp --recurse "$target:${LOG_URL%/}" "$1" --zone="$ZONE"
           fi ;;
      esac
    fi ;;
  run) run "$@" ;;
  resume)
    # The slice still up (e.g. after a maintenance event): start training again on it (with the
    # code and environment already there unless SETUP=1). Gone (spot preemption: SUSPENDED;
    # FAILED; PREEMPTED; deleted): delete what is left, create it again, SETUP=1 run. Either way
    # the run continues from the workdir's latest checkpoint.
    check_workdir "$@"
    if [ "$DRY_RUN" != 1 ]; then
      state=$(queued_state 2>/dev/null) || state=""
      case "$state" in
        ACTIVE|READY)
          echo "$target is $state: starting training again on it" >&2
          SETUP=${SETUP_GIVEN:-0} run "$@"
          exit ;;
      esac
      echo "$target is ${state:-gone}: deleting what is left and creating it again" >&2
      delete || true
    else
      queued_state
      delete
    fi
    create
    SETUP=1 run "$@" ;;
esac
