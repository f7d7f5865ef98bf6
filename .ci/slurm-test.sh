#!/usr/bin/env bash
# SLURM integration test on a real (single-node) scheduler.
#
#   sudo .ci/slurm-test.sh            # as root on a Debian/Ubuntu CI machine or container
#
# 1. installs Debian's slurm-wlm + munge (apt-get, non-interactive) unless already installed;
# 2. writes a cgroup-free single-node /etc/slurm/slurm.conf (an existing one is saved and restored;
#    state, spool and logs in a temp folder; this host = controller and compute node, partition
#    `debug`, no accounting) and starts munged (unless one runs), slurmctld and slurmd;
# 3. runs the tiny pipeline (.test/config.yaml) in a temp copy of the repository through
#    snakemake-executor-plugin-slurm with workflow/profiles/slurm (GPU requests zeroed: no GPUs here);
# 4. preemption: starts a longer fine-tuning job (checkpoint every step), `scancel`s it once
#    checkpoints/last.pt exists, lets the profile's `retries` resubmit it and checks from the job log
#    that training "resumed from ... step N" with N > 0 and that the workflow then completes;
# 5. submits `python -m mutdet.engine.launch --gpus 1 -- <sleeper>` with sbatch, signals only the
#    batch step's main process (scancel --batch) and checks the launcher forwarded SIGTERM.
#
# Takes about 7 minutes on 2 cores (plus apt-get the first time).
#
# Prints "SKIPPED: ..." and exits 0 when installing/starting SLURM is impossible here (not root, no
# apt-get, no network); any other failure exits non-zero. Daemons are stopped on exit.
# Environment: PYTHON (default .venv/bin/python of this repository), KEEP_TMP=1 keeps the temp folder,
# SNAKEMAKE_TIMEOUT (seconds per snakemake run, default 1200).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$REPO/.venv/bin/python}"
START=$(date +%s)
log() { echo "[slurm-test $(( $(date +%s) - START ))s] $*"; }
skip() { echo "SKIPPED: slurm-test: $*"; exit 0; }
die() { echo "FAILED: slurm-test: $*" >&2; exit 1; }

# ---- 1. installation ------------------------------------------------------------------------------
[ -x "$PY" ] || die "no python at $PY (run 'make install' or set PYTHON)"
need_apt=0
for cmd in slurmctld slurmd sbatch squeue scancel sinfo munged; do
    command -v "$cmd" >/dev/null 2>&1 || need_apt=1
done
if [ "$need_apt" = 1 ]; then
    [ "$(id -u)" = 0 ] || skip "slurm-wlm/munge are not installed and this is not root (cannot apt-get)"
    command -v apt-get >/dev/null 2>&1 || skip "slurm-wlm/munge are not installed and there is no apt-get"
    log "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null 2>&1 || skip "apt-get update failed (no network or no mirror?)"
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null 2>&1 \
        || skip "apt-get install slurm-wlm munge failed (no network or package unavailable?)"
fi
[ "$(id -u)" = 0 ] || skip "starting slurmctld/slurmd needs root"
if ! "$PY" -c "import snakemake_executor_plugin_slurm" 2>/dev/null; then
    log "installing the pinned snakemake-executor-plugin-slurm"
    pins=$(grep -E '^(snakemake-executor-plugin-slurm|snakemake-executor-plugin-slurm-jobstep|pandas|throttler)==' \
        "$REPO/requirements.txt" || true)
    # shellcheck disable=SC2086
    "$PY" -m pip install --quiet $pins >/dev/null 2>&1 || skip "pip install of the SLURM executor plugin failed"
fi

# ---- 2. a single-node cluster ---------------------------------------------------------------------
T="$(mktemp -d /tmp/mutdet-slurm.XXXXXX)"
chmod 755 "$T"
HOST="$(hostname -s)"
SLURMCTLD_PID="" SLURMD_PID="" MUNGED_STARTED=0 SNAKE_PID="" CONF_WRITTEN=0
# Job steps (srun inside a batch job) read the default path, not $SLURM_CONF: the config goes to
# /etc/slurm/slurm.conf (an existing one is saved and restored on exit).
CONF=/etc/slurm/slurm.conf
MUNGED_PID_FILE=/run/munge/mutdet-ci-munged.pid
cleanup() {
    rc=$?
    trap - EXIT INT TERM
    set +e
    cd /
    [ -n "$SNAKE_PID" ] && kill "$SNAKE_PID" 2>/dev/null
    if [ -n "$SLURMCTLD_PID" ]; then scancel --full --user root >/dev/null 2>&1; sleep 1; fi
    for pid in $SLURMD_PID $SLURMCTLD_PID; do kill "$pid" 2>/dev/null; done
    for pid in $SLURMD_PID $SLURMCTLD_PID; do
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -9 "$pid" 2>/dev/null
    done
    if [ "$MUNGED_STARTED" = 1 ] && [ -f "$MUNGED_PID_FILE" ]; then kill "$(cat "$MUNGED_PID_FILE")" 2>/dev/null; rm -f "$MUNGED_PID_FILE"; fi
    if [ -f "$T/slurm.conf.orig" ]; then mv -f "$T/slurm.conf.orig" "$CONF"; elif [ "$CONF_WRITTEN" = 1 ]; then rm -f "$CONF"; fi
    if [ "$rc" != 0 ]; then
        for f in "$T"/slurmctld.log "$T"/slurmd.log; do
            [ -f "$f" ] && { echo "---- tail $f"; tail -n 30 "$f"; }
        done
    fi
    if [ "${KEEP_TMP:-0}" = 1 ] || [ "$rc" != 0 ]; then echo "temp folder kept: $T"; else rm -rf "$T"; fi
    log "exit $rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# munge: reuse a running munged, else start one (key created if missing)
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null 2>&1; then mungekey --create --force; else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
        chown munge:munge /etc/munge/munge.key 2>/dev/null || true
        chmod 600 /etc/munge/munge.key
    fi
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
    chmod 755 /run/munge
    log "starting munged"
    if id munge >/dev/null 2>&1; then
        runuser -u munge -- munged --pid-file="$MUNGED_PID_FILE" >"$T/munged.out" 2>&1 || die "munged failed: $(cat "$T/munged.out")"
    else
        munged --force --pid-file="$MUNGED_PID_FILE" >"$T/munged.out" 2>&1 || die "munged failed: $(cat "$T/munged.out")"
    fi
    MUNGED_STARTED=1
    for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
    munge -n | unmunge >/dev/null || die "munge does not work"
fi

CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) * 9 / 10 ))
mkdir -p "$T/state" "$T/spool"
mkdir -p /etc/slurm
[ -e "$CONF" ] && cp -p "$CONF" "$T/slurm.conf.orig"
CONF_WRITTEN=1
export SLURM_CONF="$CONF"
cat > "$SLURM_CONF" <<EOF
# mutdet CI: one host is controller and compute node; no cgroups, no accounting database.
ClusterName=mutdetci
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$T/state
SlurmdSpoolDir=$T/spool
SlurmctldPidFile=$T/slurmctld.pid
SlurmdPidFile=$T/slurmd.pid
SlurmctldLogFile=$T/slurmctld.log
SlurmdLogFile=$T/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
# finished jobs stay visible to squeue for 10 min (the executor plugin then queries squeue, not sacct)
MinJobAge=600
KillWait=10
SchedulerType=sched/backfill
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF

log "starting slurmctld and slurmd (SLURM_CONF=$SLURM_CONF)"
slurmctld -D -f "$SLURM_CONF" >"$T/slurmctld.out" 2>&1 &
SLURMCTLD_PID=$!
sleep 1
slurmd -D -f "$SLURM_CONF" >"$T/slurmd.out" 2>&1 &
SLURMD_PID=$!
state=""
for _ in $(seq 60); do
    state=$(sinfo -h -N -n "$HOST" -o "%t" 2>/dev/null | head -n1 || true)
    [ "$state" = "idle" ] && break
    sleep 1
done
[ "$state" = "idle" ] || { cat "$T/slurmctld.out" "$T/slurmd.out"; die "node $HOST is '$state', not idle, after 60 s"; }
log "node $HOST idle: $(sinfo -h -o '%P %D %c %m' | head -n1)"

# ---- 3. the tiny pipeline through the SLURM executor ----------------------------------------------
W="$T/repo"
mkdir -p "$W"
tar -C "$REPO" --exclude=./.venv --exclude=./.git --exclude=./results --exclude=./.snakemake \
    --exclude=./.pytest_cache --exclude='*/__pycache__' --exclude=./wandb -cf - . | tar -C "$W" -xf -
cd "$W"
export PATH="$(dirname "$PY"):$PATH" WANDB_MODE=disabled
# The CI profile: workflow/profiles/slurm with GPU requests removed (no GPU here), 1 CPU per job so
# both cores are used, fast status checks and the `debug` partition without an account.
"$PY" - <<'EOF'
import yaml
from pathlib import Path
cfg = yaml.safe_load(Path("workflow/profiles/slurm/config.yaml").read_text())
dr = {k: v for k, v in (cfg.get("default-resources") or {}).items() if k != "slurm_account"}
dr.update(slurm_partition="debug", mem_mb=3000, cpus_per_task=1, runtime=30)
cfg["default-resources"] = dr
sr = {}
for rule, res in (cfg.get("set-resources") or {}).items():
    gpu_rule = any(k in res for k in ("gpu", "gres", "gpu_model"))
    res = {k: v for k, v in res.items() if k not in ("gpu", "gres", "gpu_model", "slurm_partition", "slurm_account")}
    res.update(mem_mb=3000, cpus_per_task=1, runtime=30, **({"gpu": 0} if gpu_rule else {}))
    sr[rule] = res
cfg["set-resources"] = sr
cfg["set-threads"] = {rule: 1 for rule in cfg.get("set-threads") or {}}
cfg.update({"jobs": 4, "slurm-init-seconds-before-status-checks": 5, "slurm-status-command": "squeue",
            "slurm-keep-successful-logs": True, "latency-wait": 5})
Path("ci-profile").mkdir()
Path("ci-profile/config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
print(Path("ci-profile/config.yaml").read_text())
EOF
# (a hard limit per snakemake run: a job stuck in the queue must fail the test, not hang it)
SNAKEMAKE=(timeout "${SNAKEMAKE_TIMEOUT:-1200}" "$PY" -m snakemake --executor slurm --profile ci-profile)

log "pipeline: snakemake --executor slurm --profile workflow/profiles/slurm (CI variant) --configfile .test/config.yaml"
"${SNAKEMAKE[@]}" --configfile .test/config.yaml >"$T/run1.log" 2>&1 || { tail -n 80 "$T/run1.log"; die "pipeline failed"; }
FT=results/finetune/init~none/frac~1.0/epochs~1/seed~42/tiny/test
for f in results/tiny/tiles/train/shard-0/tiles.parquet results/tiny/tiles/test/shard-1/tiles.parquet \
         results/tiny/fractions/train/frac~0.5.txt "$FT/checkpoint.pt" "$FT/detections.parquet" "$FT/metrics.json"; do
    [ -s "$f" ] || { tail -n 40 "$T/run1.log"; die "missing output $f"; }
done
ls results/targets/*/*/pca_kmeans.npz >/dev/null || die "missing the clustering output"
SUBMITTED=$(grep -c "has been submitted with SLURM jobid" "$T/run1.log" || true)
[ "$SUBMITTED" -ge 10 ] || { tail -n 40 "$T/run1.log"; die "only $SUBMITTED jobs were submitted through SLURM"; }
"$PY" -m snakemake --profile ci-profile --executor slurm --configfile .test/config.yaml -n 2>&1 | grep -q "Nothing to be done" \
    || die "a second dry run still has jobs to do"
log "pipeline OK: $SUBMITTED SLURM jobs; final outputs present; nothing left to do"

# ---- 4. preemption: scancel a fine-tuning job, the retry resumes from checkpoints/last.pt ---------
"$PY" - <<'EOF'
import yaml
from pathlib import Path
cfg = yaml.safe_load(Path(".test/config.yaml").read_text())
cfg["finetune"]["runs"] = [{"dataset": "tiny", "inits": ["none"], "fractions": [1.0], "epochs": [60]}]
cfg["finetune"]["train"].update(max_iterations=None, checkpoint_every_iterations=1, log_every=1)
Path("preempt.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
EOF
PFT=results/finetune/init~none/frac~1.0/epochs~60/seed~42/tiny/test
PLOG=results/logs/finetune/init~none/frac~1.0/epochs~60/seed~42/tiny/test.log
log "preemption: long fine-tuning job (60 epochs, checkpoint every step)"
"${SNAKEMAKE[@]}" --configfile preempt.yaml >"$T/run2.log" 2>&1 &
SNAKE_PID=$!
for _ in $(seq 300); do
    [ -s "$PFT/checkpoints/last.pt" ] && [ "$(grep -c '"step"' "$PFT/metrics.jsonl" 2>/dev/null || echo 0)" -ge 3 ] && break
    kill -0 "$SNAKE_PID" 2>/dev/null || { tail -n 40 "$T/run2.log"; die "snakemake ended before the checkpoint appeared"; }
    sleep 1
done
[ -s "$PFT/checkpoints/last.pt" ] || die "no $PFT/checkpoints/last.pt after 300 s"
JOB=$(squeue -h -o "%i %k" | awk '$2 ~ /^rule_finetune/ {print $1}' | head -n1)
[ -n "$JOB" ] || die "no running finetune job in squeue"
log "scancel $JOB (job at step $(grep -c '"step"' "$PFT/metrics.jsonl"))"
scancel "$JOB"
wait "$SNAKE_PID" || { SNAKE_PID=""; tail -n 60 "$T/run2.log"; die "the workflow did not recover from the cancelled job"; }
SNAKE_PID=""
squeue -h --states=all -j "$JOB" -o "%T" | grep -q CANCELLED || die "job $JOB was not recorded as CANCELLED"
line=$(grep -E "resumed from .*checkpoints/last\.pt at epoch [0-9]+, batch [0-9]+, step [0-9]+" "$PLOG" | tail -n1 || true)
[ -n "$line" ] || { tail -n 30 "$PLOG"; die "the retried job did not resume from checkpoints/last.pt"; }
step=$(sed -E 's/.*step ([0-9]+).*/\1/' <<<"$line")
[ "$step" -gt 0 ] || die "resumed at step $step"
[ -s "$PFT/metrics.json" ] || die "missing $PFT/metrics.json after the resumed run"
"$PY" -m snakemake --profile ci-profile --executor slurm --configfile preempt.yaml -n 2>&1 | grep -q "Nothing to be done" \
    || die "after the resumed run a dry run still has jobs to do"
log "preemption OK: $line"

# ---- 5. the GPU-job launcher under SLURM: a SIGTERM to the batch step's main process (the launcher)
#         must reach the command; no GPU here, so --gpus 1 falls back to the CPU.
cat > "$T/sleeper.py" <<'EOF'
import signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
signal.signal(signal.SIGTERM, lambda s, f: (out.write_text("SIGTERM"), sys.exit(43)))
Path(str(out) + ".started").write_text("")
time.sleep(300)
EOF
LJOB=$(sbatch --parsable -p debug -c 1 --mem 500 -t 5 -o "$T/launch-%j.out" \
    --wrap "exec $PY -m mutdet.engine.launch --gpus 1 --torchrun -- $PY $T/sleeper.py $T/launch.sig")
for _ in $(seq 60); do [ -e "$T/launch.sig.started" ] && break; sleep 1; done
[ -e "$T/launch.sig.started" ] || { cat "$T/launch-$LJOB.out"; die "launcher job $LJOB did not start its command"; }
scancel --batch --signal=TERM "$LJOB"   # only the batch step's main process, i.e. the launcher
for _ in $(seq 60); do squeue -h -j "$LJOB" -o %T 2>/dev/null | grep -Eq "RUNNING|COMPLETING" || break; sleep 1; done
[ "$(cat "$T/launch.sig" 2>/dev/null)" = SIGTERM ] || { cat "$T/launch-$LJOB.out"; die "SIGTERM was not forwarded by the launcher"; }
grep -q "running on the CPU" "$T/launch-$LJOB.out" || { cat "$T/launch-$LJOB.out"; die "the launcher did not fall back to the CPU"; }
scontrol show job "$LJOB" | grep -q "ExitCode=43:0" \
    || { scontrol show job "$LJOB"; die "job $LJOB did not end with the command's exit code 43"; }
log "launcher OK: job $LJOB: SIGTERM forwarded to the command, its exit code 43 returned"
log "PASSED in $(( $(date +%s) - START )) s"
