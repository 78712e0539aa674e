#!/usr/bin/env bash
# Multi-GPU CAML end to end with nnU-Net's own launcher, on a machine with at least 2 CUDA GPUs:
#
#   bash benchmarks/ddp_check.sh [WORKDIR]                  (WORKDIR default: ./ddp_check)
#
# On nnU-Net's real 3d_fullres plans for LA-sized scans (benchmarks/real_plans.py), with the test trainer
# nnUNetTrainerCAML_envEpochs (CAML_TEST_EPOCHS epochs of 3 steps, tests/trainers):
#   1. nnUNetv2_train -num_gpus 2, 1 epoch, torch.compile as nnU-Net decides (on by default on CUDA);
#   2. --c on 2 GPUs to epoch 2 (eager): both ranks restore the checkpoint (same CAML state digest as the file);
#   3. --c on 1 GPU to epoch 3: the 2-GPU checkpoint resumes on one;
#   4. --c on 2 GPUs to epoch 4: the 1-GPU checkpoint resumes on two;
#   5. nnUNetv2_predict with the final checkpoint (the main network only);
#   6. benchmarks/ddp_overhead.py with nccl: CAML's extra communication per step on these GPUs.
# Each training also runs nnU-Net's final validation. Logs and results stay in WORKDIR; the script exits 1 if any
# check failed. Needs a checkout (tests/trainers) with the package installed (pip install -e .).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(realpath -m "${1:-ddp_check}")
python -c "import sys, torch; sys.exit(0 if torch.cuda.device_count() >= 2 else 'ddp_check.sh needs 2 CUDA GPUs')"
mkdir -p "$work"
export nnUNet_extTrainer="$repo/trainers:$repo/tests/trainers"
export nnUNet_raw="$work/atrium/nnUNet_raw" nnUNet_preprocessed="$work/atrium/nnUNet_preprocessed"
export nnUNet_results="$work/nnUNet_results"
trainer=nnUNetTrainerCAML_envEpochs
output="$nnUNet_results/Dataset721_CAMLSyntheticAtrium/${trainer}__nnUNetPlans__3d_fullres/fold_all"
start=$SECONDS
failed=()
say() { echo "== $* ($(date +%T), $((SECONDS - start)) s)"; }
check() {  # description, command...
  if "${@:2}"; then echo "   ok: $1"; else echo "   FAILED: $1"; failed+=("$1"); fi
}
digest() {  # the CAML state digest of the final checkpoint, as the trainer logs it after loading ("none": no file)
  python -c "import sys, torch; from nnunetv2_caml.checkpoints import CAML_STATE_KEYS, caml_state_digest as d
c = torch.load(sys.argv[1], map_location='cpu', weights_only=False); print(d(*(c[k] for k in CAML_STATE_KEYS)))" \
    "$output/checkpoint_final.pth" 2> /dev/null || echo none
}
epoch() {  # the epoch of the final checkpoint ("none": no file)
  python -c "import sys, torch; print(torch.load(sys.argv[1], map_location='cpu', weights_only=False)['current_epoch'])" \
    "$output/checkpoint_final.pth" 2> /dev/null || echo none
}
train() {  # name, epochs, GPUs, extra flags...: runs nnUNetv2_train, keeps its output in $work/<name>.log
  local name=$1 epochs=$2 gpus=$3; shift 3
  say "$name: nnUNetv2_train -num_gpus $gpus $* to epoch $epochs"
  local run=(nnUNetv2_train 721 3d_fullres all -tr "$trainer" -num_gpus "$gpus")
  if ! CAML_TEST_EPOCHS=$epochs "${run[@]}" "$@" > "$work/$name.log" 2>&1; then
    # nnU-Net warns that compiled DDP training with 1 patch per GPU can crash in the final validation, and advises
    # rerunning it with --val; a crash after training there is nnU-Net's case, not CAML's
    if grep -q "batch size is 1 during training and torch.compile is enabled" "$work/$name.log" &&
        [ "$(epoch)" = "$epochs" ] && CAML_TEST_EPOCHS=$epochs "${run[@]}" --val >> "$work/$name.log" 2>&1; then
      echo "   note: $name's final validation crashed after training (nnU-Net's compile + 1 patch per GPU case); --val passed"
    else
      tail -40 "$work/$name.log"; failed+=("$name exits 0"); return 1
    fi
  fi
  check "$name: checkpoint_final at epoch $epochs" test "$(epoch)" = "$epochs"
  check "$name: final validation" grep -q "Mean Validation Dice" "$work/$name.log"
}
loaded_on() {  # log, ranks, digest: each rank logged loading the checkpoint with that CAML state digest
  test "$(grep -c "CAML: loaded .* state digest $3" "$1")" = "$2"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$work/device.txt"
say "plans and data"
python "$repo/benchmarks/real_plans.py" --workdir "$work/atrium" --size atrium -np "$(nproc)" > "$work/plans.log" 2>&1 \
  || { tail -30 "$work/plans.log"; exit 1; }
rm -rf "$output"

if train two_gpus 1 2; then
  check "two_gpus: both ranks trained their share of the batch" \
    test "$(grep -c "CAML: rank [01] of 2 draws 1 labeled and 1 unlabeled" "$work/two_gpus.log")" = 2
  check "two_gpus: both networks compiled" grep -q "CAML: using torch.compile for the auxiliary network" \
    "$work/two_gpus.log"
fi
d1=$(digest)
nnUNet_compile=f train two_gpus_resumed 2 2 --c && check "two_gpus_resumed: both ranks restored CAML's state" \
  loaded_on "$work/two_gpus_resumed.log" 2 "$d1"
d2=$(digest)
CUDA_VISIBLE_DEVICES=0 nnUNet_compile=f train one_gpu 3 1 --c && check "one_gpu: resumed the 2-GPU checkpoint" \
  loaded_on "$work/one_gpu.log" 1 "$d2"
d3=$(digest)
nnUNet_compile=f train two_gpus_again 4 2 --c && check "two_gpus_again: both ranks resumed the 1-GPU checkpoint" \
  loaded_on "$work/two_gpus_again.log" 2 "$d3"

say "nnUNetv2_predict"
images="$nnUNet_raw/Dataset721_CAMLSyntheticAtrium/imagesTr"
if nnUNetv2_predict -i "$images" -o "$work/predictions" -d 721 -c 3d_fullres -f all -tr "$trainer" \
    -chk checkpoint_final.pth > "$work/predict.log" 2>&1; then
  check "predict: one segmentation per image" test "$(ls "$work/predictions"/*.nii.gz | wc -l)" = \
    "$(ls "$images" | wc -l)"
else
  tail -30 "$work/predict.log"; failed+=("predict exits 0")
fi

say "communication per step (nccl)"
python "$repo/benchmarks/ddp_overhead.py" -d 721 -c 3d_fullres --backend nccl 2>&1 | tee "$work/overhead.txt" \
  || failed+=("ddp_overhead")
say "ddp_check done: logs in $work"
if [ ${#failed[@]} -gt 0 ]; then printf 'FAILED: %s\n' "${failed[@]}"; exit 1; fi
