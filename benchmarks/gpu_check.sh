#!/usr/bin/env bash
# The GPU check: ONE command for a lent H200 machine (1 GPU, 16 cores, Python 3.12 with torch+CUDA,
# no internet, no open_clip), done in under 8 minutes of wall time. Steps, each timed and bounded:
#   install  the carried wheels (.whl/: open_clip_torch, ftfy, wcwidth) into /tmp/site
#   env      GPU name, torch/CUDA/cuDNN versions, package versions, a bf16 8192^3 matmul ceiling
#   step     ViT-B-32 @224 px, bf16 autocast, batch 256: ctp finetune and incclip steps
#            (ctp.train.train_on_chunk) against open_clip's own step (ClipLoss + AdamW) on the
#            same batches: pairs/s, peak memory per variant, MFU (benchmarks/gpu_step.py)
#   sweep    python benchmarks/continual.py run --sweep test --jobs 8, with the time left
#            (results are resumable: finished cells land in benchmarks/results/<sweep>/)
#   pack     benchmarks/results -> one results.tar.gz (the run tool returns 8 files, 2 folders deep)
#
# Usage, in a later session with a device:
#   here:   bash benchmarks/gpu_wheels.sh                          # .whl/, ~2.3 MB, git-ignored
#   device: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
#   local:  bash benchmarks/gpu_check.sh --dry-run                 # CPU, tiny model, < ~60 s
# Options: --dry-run, --batch-size N (256), --skip-sweep, --budget SECONDS (whole script, 450).
# Env: PYTHON (python3); SWEEP_JOBS (8), SWEEP_THREADS (1); SWEEP_ONLY ("stream=X seed=0": the
# sweep's --only filters); SWEEP_DEVICE: cpu (default: the sweep's experiments see no GPU, so its
# cells compute the same fp32 figures as cells run on CPUs elsewhere) or cuda (bf16 on the GPU,
# all jobs sharing it).
#
# What comes back under $OUT (also written to runs/gpu_check/ when $OUT is unset):
#   gpu_figures.json  mode, budget, every step's rc/seconds/timeout, env{...}, step{variants:
#                     finetune/incclip/open_clip: pairs_per_s, ms_per_step, peak_gib, variant_gib,
#                     mfu, mfu_vs_matmul, ...}, sweep{rc, result files before/after}
#   gpu_check.log     everything printed
#   results.tar.gz    benchmarks/results (all sweeps' result files, old and new)
#   sweep_logs.tar.gz the sweep's per-cell logs (runs/continual/**/log.txt), for failed cells
# Exit status: 0 when install/env/step succeeded; the sweep's rc (124 = stopped by its timeout,
# the normal end) is in the JSON and the summary, not in the exit status.
# --dry-run: the same steps on the CPU with ctp-vit-micro-32 (32 px, batch 8, 1 warm-up + 3 timed
# steps, 1 round), no install; peak memory is None on CPU and MFU is against a nominal 1 TFLOP/s,
# so only its plumbing means anything; the sweep is skipped (one test cell is a whole `ctp
# experiment`), after checking that continual.py has its `run` command.
set -euo pipefail
export PYTHONUNBUFFERED=1

# ---- device budget, seconds of wall time (the run call's timeout_s=540 leaves 90 s over this) ----
TOTAL_S=450   # the whole script
INSTALL_S=60  # install: pip from .whl/ + import check (~10 s)
ENV_S=60      # env: torch import, CUDA init, matmul ceiling (~15 s)
STEP_S=180    # step: data, 3 variants x 2 rounds x (3 warm-up + 20 timed) steps (~60 s expected)
PACK_S=30     # pack + summary, kept back at the end
# sweep: TOTAL_S - time spent so far - PACK_S (>= ~120 s; skipped under 60 s)

DRY=0 SKIP_SWEEP=0 BATCH=256
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --skip-sweep) SKIP_SWEEP=1 ;;
    --batch-size) BATCH=$2; shift ;;
    --budget) TOTAL_S=$2; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
DEST=${OUT:-$ROOT/runs/gpu_check}
mkdir -p "$DEST"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
if [ $DRY = 1 ]; then
  DEVICE=cpu MODEL=ctp-vit-micro-32 BATCH=8 STEPS=3 WARMUP=1 ROUNDS=1
  STEP_ARGS=(--peak-tflops 1)  # nominal, so the MFU arithmetic runs
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  DEVICE=cuda MODEL=ViT-B-32 STEPS=20 WARMUP=3 ROUNDS=2
  STEP_ARGS=()
fi
SWEEP=(benchmarks/continual.py run --sweep test --jobs "${SWEEP_JOBS:-8}" --threads "${SWEEP_THREADS:-1}")
if [ -n "${SWEEP_ONLY:-}" ]; then
  read -r -a only <<<"$SWEEP_ONLY"
  SWEEP+=(--only "${only[@]}")
fi

run_step() {  # run_step NAME TIMEOUT_S CMD...: bounded, timed, rc recorded; never stops the script
  local name=$1 limit=$2 rc=0 t0 secs
  shift 2
  t0=$(date +%s.%N)
  echo "=== [$name] $(date -u +%H:%M:%S) timeout ${limit}s: $*"
  timeout --kill-after=15 "$limit" "$@" || rc=$?
  secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  echo "=== [$name] rc $rc in ${secs}s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$limit" >>"$WORK/steps.tsv"
}

count_results() { find benchmarks/results -name '*.json' 2>/dev/null | wc -l; }

main() {
  echo "gpu_check $([ $DRY = 1 ] && echo --dry-run) at $(date -u +%FT%TZ) on $(hostname), $(getconf _NPROCESSORS_ONLN) cores;" \
    "budget ${TOTAL_S}s: install ${INSTALL_S} env ${ENV_S} step ${STEP_S} sweep (the rest) pack ${PACK_S}"
  : >"$WORK/steps.tsv"
  if [ $DRY = 0 ]; then
    if compgen -G ".whl/*.whl" >/dev/null; then
      run_step install "$INSTALL_S" bash -c "$PY -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:\$PYTHONPATH $PY -c \
        'import ftfy, open_clip; print(\"open_clip\", open_clip.__version__, \"from\", open_clip.__file__)'"
      export PYTHONPATH=$ROOT:/tmp/site
    else
      echo "no .whl/*.whl: run benchmarks/gpu_wheels.sh here and carry \".whl\" (open_clip is not on the machine)"
    fi
    nvidia-smi || true
  fi
  run_step env "$ENV_S" "$PY" benchmarks/gpu_step.py env --device $DEVICE --json "$WORK/env.json"
  run_step step "$STEP_S" "$PY" benchmarks/gpu_step.py step --model $MODEL --batch-size "$BATCH" --steps $STEPS \
    --warmup $WARMUP --rounds $ROUNDS --device $DEVICE --env-json "$WORK/env.json" --json "$WORK/step.json" \
    "${STEP_ARGS[@]}"

  local left cli=0 help sweep_env=()
  # the sweep CLI (run --sweep/--jobs/--threads) is being rewritten: check for it before spending time;
  # in --dry-run by reading the source (the old script's imports cost ~20 s on 2 busy cores)
  if [ $DRY = 1 ]; then
    grep -q '"--sweep"' benchmarks/continual.py && grep -q '"--threads"' benchmarks/continual.py && cli=1
  else
    help=$(timeout 60 "$PY" benchmarks/continual.py run --help 2>&1 || true)
    [[ $help == *--sweep* && $help == *--threads* ]] && cli=1
  fi
  echo "$cli" >"$WORK/sweep_cli"
  count_results >"$WORK/results_before"
  [ "${SWEEP_DEVICE:-cpu}" = cuda ] || sweep_env=(env CUDA_VISIBLE_DEVICES=)
  local skip=""
  left=$((TOTAL_S - SECONDS - PACK_S))
  if [ $DRY = 1 ]; then
    skip="--dry-run (one test cell is a whole ctp experiment); continual.py's run --sweep CLI: \
$([ $cli = 1 ] && echo present || echo MISSING)"
  elif [ $SKIP_SWEEP = 1 ]; then
    skip="--skip-sweep"
  elif [ $cli = 0 ]; then
    skip="benchmarks/continual.py has no 'run --sweep' command (the rewrite is not in this tree)"
  elif [ $left -lt 60 ]; then
    skip="only ${left}s left of the budget"
  fi
  if [ -n "$skip" ]; then
    echo "=== [sweep] skipped: $skip"
  else
    run_step sweep "$left" "${sweep_env[@]}" "$PY" "${SWEEP[@]}"
  fi
  echo "$skip" >"$WORK/sweep_skip"
  count_results >"$WORK/results_after"

  local t0=$SECONDS rc=0
  if [ -d benchmarks/results ]; then
    tar -czf "$DEST/results.tar.gz" -C benchmarks results || rc=$?
    echo "packed benchmarks/results ($(count_results) result files) into $DEST/results.tar.gz: rc $rc"
  else
    echo "no benchmarks/results to pack"
  fi
  if [ -d runs/continual ]; then
    find runs/continual -name log.txt -print0 | tar -czf "$DEST/sweep_logs.tar.gz" --null -T - || rc=$?
  fi
  printf 'pack\t%s\t%s\t%s\n' "$rc" $((SECONDS - t0)) "$PACK_S" >>"$WORK/steps.tsv"

  DRY=$DRY WORK=$WORK DEST=$DEST TOTAL_S=$TOTAL_S INSTALL_S=$INSTALL_S ENV_S=$ENV_S STEP_S=$STEP_S \
    PACK_S=$PACK_S SWEEP_CMD="${sweep_env[*]} python ${SWEEP[*]}" "$PY" - <<'EOF'
import json, os
from pathlib import Path

work, dest = Path(os.environ["WORK"]), Path(os.environ["DEST"])
def load(name):
    p = work / name
    return json.loads(p.read_text()) if p.is_file() else None
steps = {}
for line in (work / "steps.tsv").read_text().splitlines():
    name, rc, secs, limit = line.split("\t")
    steps[name] = {"rc": int(rc), "seconds": float(secs), "timeout_s": int(limit)}
sweep = dict(steps.get("sweep", {"rc": None}), command=os.environ["SWEEP_CMD"],
             cli_present=(work / "sweep_cli").read_text().strip() == "1",
             skipped=(work / "sweep_skip").read_text().strip() or None,
             result_files_before=int((work / "results_before").read_text()),
             result_files_after=int((work / "results_after").read_text()))
fig = {"mode": "dry-run" if os.environ["DRY"] == "1" else "device",
       "budget_s": {k.lower()[:-2]: int(os.environ[k]) for k in ("TOTAL_S", "INSTALL_S", "ENV_S", "STEP_S", "PACK_S")},
       "steps": steps, "env": load("env.json"), "step": load("step.json"), "sweep": sweep,
       "files": sorted(p.name for p in dest.iterdir() if p.name != "gpu_check.log") + ["gpu_figures.json"]}
(dest / "gpu_figures.json").write_text(json.dumps(fig, indent=1))
print("\n==== summary", fig["mode"], "->", dest / "gpu_figures.json")
for name, s in steps.items():
    print(f"  {name:<8} rc {s['rc']:>3}  {s['seconds']:>6.1f} s of {s['timeout_s']} s")
env = fig["env"] or {}
print(f"  {env.get('gpu', env.get('device'))}, torch {env.get('torch')}, CUDA {env.get('torch_cuda')}, "
      f"matmul bf16 {env.get('matmul_bf16_tflops')} TFLOP/s")
st = fig["step"]
if st:
    print(f"  {st['model']} @{st['image_size']} batch {st['batch_size']} {st['autocast']}: "
          f"{st['flops_per_pair']:.4g} FLOP/pair ({st['flops_source']}), peak {st['peak_tflops']} TFLOP/s")
    for name, v in st["variants"].items():
        mfu = "-" if v["mfu"] is None else f"{100 * v['mfu']:.3g}%"
        print(f"  {name:<9} {v['pairs_per_s']:>8.0f} pairs/s  {v['ms_per_step']:>8.2f} ms/step  MFU {mfu:>6}"
              f"  peak {v['peak_gib']} GiB (own {v['variant_gib']})")
print(f"  sweep rc {sweep['rc']}, result files {sweep['result_files_before']} -> {sweep['result_files_after']}")
EOF
  local s
  for s in install env step; do
    awk -F'\t' -v s=$s '$1 == s && $2 != 0 { bad = 1 } END { exit bad }' "$WORK/steps.tsv" || return 1
  done
}

rm -f "$DEST"/gpu_figures.json "$DEST"/results.tar.gz "$DEST"/sweep_logs.tar.gz
set +e
main 2>&1 | tee "$DEST/gpu_check.log"
exit "${PIPESTATUS[0]}"
