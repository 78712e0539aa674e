#!/usr/bin/env bash
# Every GPU check of CAML at the size and speed users train, on one CUDA GPU:
#
#   bash benchmarks/gpu_check.sh [WORKDIR] [PART ...]     (WORKDIR default: ./gpu_check; PART default: compile atrium
#                                                          vessel memory, the checks of the issue, meant for one go)
#
#   compile          benchmarks/compile_check.py on the 3d_fullres plans nnU-Net makes for LA-sized scans
#                    (benchmarks/real_plans.py): nnU-Net's decision compiles both networks (inductor, AMP), no graph
#                    break and no recompilation over 20 steps, eager and compiled losses equal within AMP tolerance,
#                    the compiled checkpoint loads into an eager trainer
#   atrium           the same plans: s/step and peak memory of stock and CAML, compiled as nnU-Net decides
#                    (benchmarks/step_time.py), then a profile of 5 steps of each
#   vessel           vessel-sized CT (200x512x512 at 0.5x0.4x0.4 mm), nnU-Net's default plans: stock and CAML, eager
#                    (nnUNet_compile=f)
#   memory           peak memory of CAML, eager, on plans made with nnU-Net's -gpu_memory_target (GPU_MEMORY_TARGETS,
#                    default "4 6") for both sizes: which target fits CAML into a 24, 40 or 80 GB card (nnU-Net's
#                    default plans, target 8 GB, are measured against stock by atrium and vessel)
#   not by default:
#   tests            the CUDA tests of the test suite (pytest -k cuda, on the tests' tiny plans: tests/test_compile.py,
#                    and tests/test_gpu_memory.py's step that runs out of GPU memory)
#   ablations        atrium plans, compiled: stock, _noCMA, _noOCC and _pointwiseUpsampling
#   vessel_compiled  vessel default plans, compiled: stock and CAML
#   resenc           both sizes, nnU-Net's ResEnc L preset (planned for 24 GB; benchmarks/real_plans.py --resenc L),
#                    eager: s/step and peak memory of stock and CAML (a run out of memory is reported as such)
#
# Time: inductor's compiling is most of it. On an H200 (2026-12-04, torch 2.11) it took about 50 s for stock's
# network and 180 s for CAML's two; the script before this one, which compiled CAML for the compile test and again for
# the step time, and every ablation, took about 23 minutes. Here CAML compiles once: the compile check and the atrium
# step time use the same inductor settings (step_time.py --fallback_random) and one cache (TORCHINDUCTOR_CACHE_DIR,
# default WORKDIR/inductor), so the step time takes CAML's graphs from the cache (measured on 2 CPU cores with the CPU
# test trainer: all 8 of CAML's graphs, 16 s of warm-up instead of a full compile; with different settings none of the
# 8). Estimated from the H200's compile times, not yet timed on a GPU: compile about 4 min (half a minute of it
# waiting for the atrium plans), atrium about 2 min (stock compiles; CAML comes from the cache), vessel under 1 min,
# memory about 1.5 min (four eager runs of CAML): under 8 minutes. The script prints the seconds since its start at
# every step; the vessel plans (three 200x512x512 scans) are made in the background meanwhile. Each part prints its
# table and keeps it in WORKDIR/<part>*.txt (the profile too), with its full log beside it. All that the script prints
# goes to the report as well, as it is printed (GPU_CHECK_REPORT, default WORKDIR/report.txt), and at the end the logs
# are packed beside it (<report>_logs.tar.gz). On the lent GPU machine, which brings back at most 8 files from its
# $OUT, keep WORKDIR outside $OUT (datasets, plans and inductor's cache: GBs, thousands of files) and put the report
# there: GPU_CHECK_REPORT=$OUT/gpu_check.txt bash benchmarks/gpu_check.sh /tmp/gc. A run cut off by the time limit
# then still brings back the parts that finished. A failing check does not stop the others; the script exits 1 at the
# end if any failed. A rerun on the same WORKDIR reuses datasets, plans and compiled graphs (and starts a new report).
# Needs nnunetv2 and this package installed: pip install -e ., or on a machine without a package index the wheels of
# benchmarks/device_wheels.sh.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(realpath -m "${1:-gpu_check}")
shift || true
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(compile atrium vessel memory)
for part in "${parts[@]}"; do
  case $part in compile|atrium|vessel|memory|tests|ablations|vessel_compiled|resenc) ;;
    *) echo "unknown part '$part': choose from compile atrium vessel memory tests ablations vessel_compiled resenc" >&2
       exit 2 ;; esac
done
python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh needs a CUDA GPU')"
mkdir -p "$work"
report=$(realpath -m "${GPU_CHECK_REPORT:-$work/report.txt}")
mkdir -p "$(dirname "$report")"
exec > >(tee "$report") 2>&1  # everything below, as it is printed
export nnUNet_extTrainer="$repo/trainers"
export nnUNet_n_proc_DA="${nnUNet_n_proc_DA:-8}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$work/inductor}"
targets=${GPU_MEMORY_TARGETS:-"4 6"}
start=$SECONDS
failed=()
trap 'kill $(jobs -p) 2> /dev/null || true' EXIT  # plans still being made when the script stops early
say() { echo "== $* ($(date +%T), $((SECONDS - start)) s)"; }
wants() { local p; for p in "${parts[@]}"; do [[ " $* " == *" $p "* ]] && return 0; done; return 1; }

# Plans (CPU work: synthetic scans, nnU-Net's planning and preprocessing) are made in the background from the start,
# per size first nnU-Net's default plans, then those of the smaller memory targets; a part waits for what it needs.
plans_start() {  # size, targets (may be empty)
  mkdir -p "$work/$1"
  rm -f "$work/$1"/plans_*  # this run's markers, tables and logs only
  ( rc=0; python "$repo/benchmarks/real_plans.py" --workdir "$work/$1" --size "$1" -np "$(nproc)" $resenc_presets \
      > "$work/$1/plans_default.log" 2>&1 || rc=$?
    echo $rc > "$work/$1/plans_default.rc.tmp" && mv "$work/$1/plans_default.rc.tmp" "$work/$1/plans_default.rc"
    if [ "$rc" -eq 0 ] && [ -n "$2" ]; then
      python "$repo/benchmarks/real_plans.py" --workdir "$work/$1" --size "$1" --gpu_memory_target $2 \
        -np "$(nproc)" > "$work/$1/plans_targets.log" 2>&1 || rc=$?
    fi
    echo $rc > "$work/$1/plans_targets.rc.tmp" && mv "$work/$1/plans_targets.rc.tmp" "$work/$1/plans_targets.rc" ) &
}
plans_ready() {  # size, default|targets: waits for those plans, prints them into $work/<size>/plans_<which>.txt once
  local log="$work/$1/plans_$2.log" rc
  [ -f "$work/$1/plans_$2.rc" ] || say "$1: waiting for the plans"
  while [ ! -f "$work/$1/plans_$2.rc" ]; do sleep 2; done
  rc=$(cat "$work/$1/plans_$2.rc")
  [ "$2" = targets ] && [ ! -f "$log" ] && log="$work/$1/plans_default.log"
  if [ "$rc" -ne 0 ]; then tail -30 "$log"; failed+=("plans $1 $2"); return 1; fi
  [ -f "$work/$1/plans_$2.txt" ] || sed -n '/3d_fullres:$/,$p' "$log" | tee "$work/$1/plans_$2.txt"
}
in_size() {  # size, command...: runs the command in the nnU-Net environment of that size's plans
  local size=$1; shift
  nnUNet_raw="$work/$size/nnUNet_raw" nnUNet_preprocessed="$work/$size/nnUNet_preprocessed" "$@"
}
dataset_id() { [ "$1" = atrium ] && echo 721 || echo 722; }

step_time() {  # size, plans, output file, timed steps, warm-up steps, trainers and step_time.py options...
  local size=$1 plans=$2 out=$3 steps=$4 warmup=$5; shift 5
  in_size "$size" python "$repo/benchmarks/step_time.py" -d "$(dataset_id "$size")" -c 3d_fullres -f all \
    -p "$plans" -n "$steps" --warmup "$warmup" -tr "$@" > "$out.log" 2>&1 \
    || { tail -30 "$out.log"; failed+=("${out##*/}"); return 0; }
  sed -n '/^device /,$p' "$out.log" | tee "$out"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; } | tee "$work/device.txt"
python -c "import torch, nnunetv2; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
  | tee -a "$work/device.txt"
memory_targets=$(wants memory && echo "$targets" || true)
resenc_presets=$(wants resenc && echo "--resenc L" || true)  # planned with the default plans
wants compile atrium ablations memory resenc && plans_start atrium "$memory_targets"
wants vessel vessel_compiled memory resenc && plans_start vessel "$memory_targets"
for part in "${parts[@]}"; do
  case $part in
    compile)
      plans_ready atrium default || continue
      say "compile: benchmarks/compile_check.py, CAML, atrium default plans, 20 compiled steps"
      if ! in_size atrium python "$repo/benchmarks/compile_check.py" -d "$(dataset_id atrium)" -c 3d_fullres -f all \
          -tr nnUNetTrainerCAML -n 20 > "$work/compile.txt.log" 2>&1; then
        tail -30 "$work/compile.txt.log"; failed+=(compile)
      fi
      # the check's findings, without the trainers' log lines
      { sed -n '/ trainer: main network compiled/,$p' "$work/compile.txt.log" \
          | grep -v '^[0-9-]* [0-9:.]*: ' || true; } | tee "$work/compile.txt"
      ;;
    atrium)
      plans_ready atrium default || continue
      say "atrium: step time, memory and a profile of 5 steps, default plans, compiled"
      step_time atrium nnUNetPlans "$work/atrium_step_time.txt" 20 3 nnUNetTrainer nnUNetTrainerCAML \
        --fallback_random --profile 5
      ;;
    vessel)
      plans_ready vessel default || continue
      say "vessel: step time and memory, default plans, eager"
      nnUNet_compile=f step_time vessel nnUNetPlans "$work/vessel_step_time.txt" 10 2 nnUNetTrainer nnUNetTrainerCAML
      ;;
    memory)
      for size in atrium vessel; do
        plans_ready "$size" targets || continue
        for target in $targets; do
          say "memory: $size, plans nnUNetPlans_${target}_GB, eager"
          nnUNet_compile=f step_time "$size" "nnUNetPlans_${target}_GB" "$work/memory_${size}_${target}GB.txt" 2 1 \
            nnUNetTrainerCAML
        done
      done
      ;;
    tests)
      say "tests: the CUDA tests of the test suite"
      python -m pytest -q -rs -k cuda "$repo/tests" 2>&1 | tee "$work/tests.txt" || failed+=(tests)
      ;;
    ablations)
      plans_ready atrium default || continue
      say "ablations: step time and memory of stock, _noCMA, _noOCC and _pointwiseUpsampling, atrium, compiled"
      step_time atrium nnUNetPlans "$work/ablations_step_time.txt" 20 3 nnUNetTrainer nnUNetTrainerCAML_noCMA \
        nnUNetTrainerCAML_noOCC nnUNetTrainerCAML_pointwiseUpsampling --fallback_random
      ;;
    vessel_compiled)
      plans_ready vessel default || continue
      say "vessel_compiled: step time and memory, default plans, compiled"
      step_time vessel nnUNetPlans "$work/vessel_compiled_step_time.txt" 20 3 nnUNetTrainer nnUNetTrainerCAML
      ;;
    resenc)
      for size in atrium vessel; do
        plans_ready "$size" default || continue
        say "resenc: $size, nnU-Net's ResEnc L plans, step time and memory, eager"
        nnUNet_compile=f step_time "$size" nnUNetResEncUNetLPlans "$work/resenc_${size}.txt" 3 1 nnUNetTrainer \
          nnUNetTrainerCAML
      done
      ;;
  esac
done
say "gpu_check done: results in $work, report in $report"
[ -z "$(jobs -p)" ] || wait $(jobs -p)  # plans still being made for parts not asked for (a bare wait waits for tee)
(cd "$work" && find . -maxdepth 2 -name '*.log' -print0 | tar czf "${report%.txt}_logs.tar.gz" --null -T -)
if [ ${#failed[@]} -gt 0 ]; then echo "FAILED: ${failed[*]}"; exit 1; fi
