#!/usr/bin/env bash
# Every GPU check of CAML at the size and speed users train, on one CUDA GPU:
#
#   bash benchmarks/gpu_check.sh [WORKDIR] [PART ...]      (WORKDIR default: ./gpu_check; PART default: all four)
#
#   compile  the CUDA test of tests/test_compile.py: nnU-Net compiles both networks (inductor, AMP), no graph break,
#            no recompilation over 20 steps, eager and compiled losses equal within AMP tolerance
#   atrium   3d_fullres plans nnU-Net makes for LA-sized scans (benchmarks/real_plans.py): s/step and peak memory of
#            stock, CAML, _noCMA and _noOCC (benchmarks/step_time.py, compiled as nnU-Net decides)
#   vessel   the same for vessel-sized CT (200x512x512 at 0.5x0.4x0.4 mm): stock and CAML
#   memory   peak memory of stock and CAML, eager (nnUNet_compile=f: no compile time, and an upper bound of the
#            compiled peak), on plans made with nnU-Net's -gpu_memory_target (GPU_MEMORY_TARGETS, default "4 12 24")
#            for both sizes: which target fits CAML into a 24, 40 or 80 GB card
#
# Each part prints its table and keeps it in WORKDIR/<part>*.txt; datasets and plans in WORKDIR are reused by a rerun.
# Parts can be run in separate calls (e.g. when a machine allows 10 minutes per command). A failing check does not stop
# the others; the script exits 1 at the end if any failed. Needs nnunetv2 and this package installed (pip install -e .).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(realpath -m "${1:-gpu_check}")
shift || true
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(compile atrium vessel memory)
python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh needs a CUDA GPU')"
mkdir -p "$work"
export nnUNet_extTrainer="$repo/trainers"
export nnUNet_n_proc_DA="${nnUNet_n_proc_DA:-8}"
targets=${GPU_MEMORY_TARGETS:-"4 12 24"}
start=$SECONDS
failed=()
say() { echo "== $* ($(date +%T), $((SECONDS - start)) s)"; }

plans_for() {  # size, extra targets: writes $work/<size>/plans.txt
  python "$repo/benchmarks/real_plans.py" --workdir "$work/$1" --size "$1" --gpu_memory_target ${2:-} \
    -np "$(nproc)" > "$work/$1/plans.log" 2>&1 || { tail -30 "$work/$1/plans.log"; failed+=("plans $1"); return 1; }
  sed -n '/3d_fullres:$/,$p' "$work/$1/plans.log" | tee "$work/$1/plans.txt"
}

step_time() {  # size, plans, output file, timed steps, warm-up steps, trainers...
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
for part in "${parts[@]}"; do
  case $part in
    compile)
      say "compile: tests/test_compile.py on CUDA"
      python -m pytest -q -rs "$repo/tests/test_compile.py" 2>&1 | tee "$work/compile.txt" || failed+=(compile)
      ;;
    atrium)
      mkdir -p "$work/atrium"
      say "atrium: plans"; plans_for atrium || continue
      say "atrium: step time and memory, default plans"
      step_time atrium nnUNetPlans "$work/atrium_step_time.txt" 20 3 nnUNetTrainer nnUNetTrainerCAML \
        nnUNetTrainerCAML_noCMA nnUNetTrainerCAML_noOCC
      ;;
    vessel)
      mkdir -p "$work/vessel"
      say "vessel: plans"; plans_for vessel || continue
      say "vessel: step time and memory, default plans"
      step_time vessel nnUNetPlans "$work/vessel_step_time.txt" 20 3 nnUNetTrainer nnUNetTrainerCAML
      ;;
    memory)
      for size in atrium vessel; do
        mkdir -p "$work/$size"
        say "memory: $size plans for -gpu_memory_target $targets"; plans_for "$size" "$targets" || continue
        for target in $targets; do
          say "memory: $size, plans nnUNetPlans_${target}_GB, eager"
          nnUNet_compile=f step_time "$size" "nnUNetPlans_${target}_GB" "$work/memory_${size}_${target}GB.txt" 3 1 \
            nnUNetTrainer nnUNetTrainerCAML
        done
      done
      ;;
    *) echo "unknown part '$part': choose from compile atrium vessel memory" >&2; exit 2 ;;
  esac
done
say "gpu_check done: results in $work"
if [ ${#failed[@]} -gt 0 ]; then echo "FAILED: ${failed[*]}"; exit 1; fi
