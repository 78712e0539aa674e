#!/usr/bin/env bash
# Every GPU check of CAML at the size and speed users train, on one CUDA GPU:
#
#   bash benchmarks/gpu_check.sh [WORKDIR] [PART ...]      (WORKDIR default: ./gpu_check; PART default: all five)
#
#   compile    the CUDA test of tests/test_compile.py: nnU-Net compiles both networks (inductor, AMP), no graph break,
#              no recompilation over 20 steps, eager and compiled losses equal within AMP tolerance
#   atrium     3d_fullres plans nnU-Net makes for LA-sized scans (benchmarks/real_plans.py): s/step and peak memory of
#              stock, CAML and CAML_pointwiseUpsampling (benchmarks/step_time.py, compiled as nnU-Net decides), then a
#              profile of 5 steps of each
#   ablations  the same plans: stock, _noCMA and _noOCC, compiled
#   vessel     vessel-sized CT (200x512x512 at 0.5x0.4x0.4 mm): stock and CAML, compiled
#   memory     peak memory of stock and CAML, eager (nnUNet_compile=f: no compile time), on plans made with nnU-Net's
#              -gpu_memory_target (GPU_MEMORY_TARGETS, default "4 6"; nnU-Net's default plans, target 8 GB, are measured
#              by atrium and vessel) for both sizes: which target fits CAML into a 24, 40 or 80 GB card
#
# Time on one H200 (2026-12-04, a fresh machine): compile 165 s; compiling for the step time takes about 50 s for stock,
# 180 s for CAML and 90 s for each ablation (CAML_pointwiseUpsampling: not yet measured, about as long as CAML), so the
# five parts take about 23 minutes in all. Within 10-minute commands run them as separate calls on the same WORKDIR
# (datasets, plans and inductor's cache are reused), e.g. "atrium" (the compile test passed on an H200 on 2026-12-04),
# then "vessel ablations", then "compile memory". Planning runs in the background from the start while the compile check
# runs. Each part prints its table and keeps it in WORKDIR/<part>*.txt (the profile too), with its full log beside it. A
# failing check does not stop the others; the script exits 1 at the end if any failed. Needs nnunetv2 and this package
# installed (pip install -e .).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(realpath -m "${1:-gpu_check}")
shift || true
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(compile atrium memory vessel ablations)
for part in "${parts[@]}"; do
  case $part in compile|atrium|ablations|vessel|memory) ;;
    *) echo "unknown part '$part': choose from compile atrium ablations vessel memory" >&2; exit 2 ;; esac
done
python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh needs a CUDA GPU')"
mkdir -p "$work"
export nnUNet_extTrainer="$repo/trainers"
export nnUNet_n_proc_DA="${nnUNet_n_proc_DA:-8}"
targets=${GPU_MEMORY_TARGETS:-"4 6"}
start=$SECONDS
failed=()
say() { echo "== $* ($(date +%T), $((SECONDS - start)) s)"; }

# Plans (CPU work: synthetic scans, nnU-Net's planning and preprocessing) run in the background from the start, for
# every size a part needs, while the compile check uses the GPU; each part waits for its size's plans.
declare -A plan_pid plan_rc
plans_start() {  # size, extra targets: real_plans.py in the background, output in $work/<size>/plans.log
  mkdir -p "$work/$1"
  python "$repo/benchmarks/real_plans.py" --workdir "$work/$1" --size "$1" --gpu_memory_target ${2:-} \
    -np "$(nproc)" > "$work/$1/plans.log" 2>&1 &
  plan_pid[$1]=$!
}
plans_ready() {  # size: waits for its plans, prints them into $work/<size>/plans.txt
  if [ -z "${plan_rc[$1]:-}" ]; then
    local rc=0; wait "${plan_pid[$1]}" || rc=$?; plan_rc[$1]=$rc
    [ "$rc" -eq 0 ] && sed -n '/3d_fullres:$/,$p' "$work/$1/plans.log" | tee "$work/$1/plans.txt"
  fi
  [ "${plan_rc[$1]}" -eq 0 ] || { tail -30 "$work/$1/plans.log"; failed+=("plans $1"); return 1; }
}

step_time() {  # size, plans, output file, timed steps, warm-up steps, trainers and step_time.py options...
  local size=$1 plans=$2 out=$3 steps=$4 warmup=$5; shift 5
  local id; id=$([ "$size" = atrium ] && echo 721 || echo 722)
  nnUNet_raw="$work/$size/nnUNet_raw" nnUNet_preprocessed="$work/$size/nnUNet_preprocessed" \
    python "$repo/benchmarks/step_time.py" -d "$id" -c 3d_fullres -f all -p "$plans" -n "$steps" \
    --warmup "$warmup" -tr "$@" > "$out.log" 2>&1 || { tail -30 "$out.log"; failed+=("${out##*/}"); return 0; }
  sed -n '/^device /,$p' "$out.log" | tee "$out"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; } | tee "$work/device.txt"
python -c "import torch, nnunetv2; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
  | tee -a "$work/device.txt"
wants() { local p; for p in "${parts[@]}"; do [[ " $* " == *" $p "* ]] && return 0; done; return 1; }
memory_targets=$(wants memory && echo "$targets" || true)
wants atrium ablations memory && plans_start atrium "$memory_targets"
wants vessel memory && plans_start vessel "$memory_targets"
for part in "${parts[@]}"; do
  case $part in
    compile)
      say "compile: the CUDA test of tests/test_compile.py"
      python -m pytest -q -rs -k cuda "$repo/tests/test_compile.py" 2>&1 | tee "$work/compile.txt" || failed+=(compile)
      ;;
    atrium)
      say "atrium: plans"; plans_ready atrium || continue
      say "atrium: step time, memory and a profile of 5 steps, default plans"
      step_time atrium nnUNetPlans "$work/atrium_step_time.txt" 20 3 nnUNetTrainer nnUNetTrainerCAML \
        nnUNetTrainerCAML_pointwiseUpsampling --profile 5
      ;;
    ablations)
      say "ablations: plans"; plans_ready atrium || continue
      say "ablations: step time and memory of stock, _noCMA and _noOCC, atrium default plans"
      step_time atrium nnUNetPlans "$work/ablations_step_time.txt" 20 3 nnUNetTrainer nnUNetTrainerCAML_noCMA \
        nnUNetTrainerCAML_noOCC
      ;;
    vessel)
      say "vessel: plans"; plans_ready vessel || continue
      say "vessel: step time and memory, default plans"
      step_time vessel nnUNetPlans "$work/vessel_step_time.txt" 20 3 nnUNetTrainer nnUNetTrainerCAML
      ;;
    memory)
      for size in atrium vessel; do
        say "memory: $size plans for -gpu_memory_target $targets"; plans_ready "$size" || continue
        for target in $targets; do
          say "memory: $size, plans nnUNetPlans_${target}_GB, eager"
          nnUNet_compile=f step_time "$size" "nnUNetPlans_${target}_GB" "$work/memory_${size}_${target}GB.txt" 3 1 \
            nnUNetTrainer nnUNetTrainerCAML
        done
      done
      ;;
  esac
done
say "gpu_check done: results in $work"
if [ ${#failed[@]} -gt 0 ]; then echo "FAILED: ${failed[*]}"; exit 1; fi
