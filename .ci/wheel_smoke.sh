#!/usr/bin/env bash
# Smoke test of the package as a user gets it from a wheel: build the wheel, install it (not editable) into a
# separate virtual environment, and run the README's commands from a folder outside the checkout.
# Run by .ci/run with the CI environment active. The heavy dependencies (torch alone is several GB) are shared with
# that environment through a .pth file; nnunetv2_caml itself (and nnU-Net's command-line tools) come only from the
# new environment, which the first check below asserts.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

rm -rf "$repo/build"  # setuptools would pack stale modules left there by an earlier build
python -m pip wheel --quiet --no-deps -w "$work/dist" "$repo"
python -m venv "$work/env"
# the new environment's own old setuptools would shadow the shared one that torch requires
"$work/env/bin/python" -m pip uninstall --quiet --yes setuptools
env_site=$("$work/env/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$env_site/ci_shared_dependencies.pth"
nnunet_version=$(python -c 'import importlib.metadata as m; print(m.version("nnunetv2"))')
"$work/env/bin/python" -m pip install --quiet --no-deps "$work"/dist/nnunetv2_caml-*.whl "nnunetv2==$nnunet_version"
"$work/env/bin/python" -m pip check  # the wheel's declared requirements (with their bounds) are all met

mkdir "$work/run" && cd "$work/run"
export PATH="$work/env/bin:$PATH"
python -c "import nnunetv2_caml, sys; f = nnunetv2_caml.__file__; print('[wheel] nnunetv2_caml from', f); \
sys.exit(0 if f.startswith('$env_site') else 'nnunetv2_caml is not imported from the wheel')"
export nnUNet_extTrainer=$(nnUNetv2_caml_trainers_folder)
case "$nnUNet_extTrainer" in "$env_site"/*) ;; *) echo "trainers folder $nnUNet_extTrainer is not the wheel's"; exit 1;; esac
export nnUNet_n_proc_DA=1 nnUNet_def_n_proc=1 nnUNet_compile=0  # the planner needs nnUNet_n_proc_DA >= 1

echo "[wheel] nnUNetv2_caml_demo (CAML only)"
nnUNetv2_caml_demo --workdir caml_demo --no-baseline > demo.log 2>&1 || { tail -40 demo.log; exit 1; }
grep "mean" demo.log | tail -2
export nnUNet_raw=$PWD/caml_demo/nnUNet_raw nnUNet_preprocessed=$PWD/caml_demo/nnUNet_preprocessed \
       nnUNet_results=$PWD/caml_demo/nnUNet_results
raw=$(ls -d "$nnUNet_raw"/Dataset502_*)

echo "[wheel] nnUNetv2_caml_preprocess_unlabeled, nnUNetv2_train, nnUNetv2_predict, nnUNetv2_caml_evaluate"
nnUNetv2_caml_preprocess_unlabeled -d 502 -c 3d_fullres -np 1 | grep "already finished"
nnUNetv2_train 502 3d_cpu all -tr nnUNetTrainerCAML_tiny -device cpu > train.log 2>&1 || { tail -40 train.log; exit 1; }
nnUNetv2_predict -i "$raw/imagesTs" -o predictions -d 502 -c 3d_cpu -f all -tr nnUNetTrainerCAML_tiny \
  -chk checkpoint_final.pth -device cpu --disable_tta -npp 1 -nps 1 > predict.log 2>&1 || { tail -40 predict.log; exit 1; }
nnUNetv2_caml_evaluate -ref "$raw/labelsTs" -pred predictions -o summary.json | tail -2
test -s summary.json
# the cascade's command from the wheel: 3d_cpu is no cascade's first stage, which it says in one line
if nnUNetv2_caml_predict_next_stage -d 502 -c 3d_cpu -tr nnUNetTrainerCAML_tiny -f all 2> err.txt; then exit 1; fi
grep -q "^ERROR: configuration 3d_cpu has no next stage" err.txt || { cat err.txt; exit 1; }

echo "[wheel] a numbered fold: nnUNetv2_find_best_configuration, nnUNetv2_export_model_to_zip, installing it, predicting"
# 4 labeled cases are too few for nnU-Net's 5-fold split: fold 0 from a hand-written splits_final.json, as a user would
python -c "import json, os, sys; c = sorted(f[:-len('.nii.gz')] for f in os.listdir('$raw/labelsTr')); \
json.dump([{'train': c[1:], 'val': c[:1]}], open(sys.argv[1], 'w'))" "$nnUNet_preprocessed/$(basename "$raw")/splits_final.json"
nnUNetv2_train 502 3d_cpu 0 -tr nnUNetTrainerCAML_tiny -device cpu > train0.log 2>&1 || { tail -40 train0.log; exit 1; }
nnUNetv2_find_best_configuration 502 -c 3d_cpu -tr nnUNetTrainerCAML_tiny -f 0 -np 1 > best.log 2>&1 \
  || { tail -40 best.log; exit 1; }
grep -q "nnUNetv2_predict .* -f  *0 -tr nnUNetTrainerCAML_tiny -c 3d_cpu" best.log || { tail -20 best.log; exit 1; }
nnUNetv2_export_model_to_zip -d 502 -c 3d_cpu -f 0 -tr nnUNetTrainerCAML_tiny -o model.zip > export.log 2>&1 \
  || { tail -40 export.log; exit 1; }
trained=$nnUNet_results
export nnUNet_results=$PWD/installed
nnUNetv2_install_pretrained_model_from_zip model.zip > install.log 2>&1 || { tail -40 install.log; exit 1; }
model=$(basename "$raw")/nnUNetTrainerCAML_tiny__nnUNetPlans__3d_cpu/fold_0/checkpoint_final.pth
cmp "$trained/$model" "$nnUNet_results/$model"  # the installed checkpoint (both networks, CAML's state) is the trained one
nnUNetv2_predict -i "$raw/imagesTs" -o predictions0 -d 502 -c 3d_cpu -f 0 -tr nnUNetTrainerCAML_tiny -device cpu \
  --disable_tta -npp 1 -nps 1 > predict0.log 2>&1 || { tail -40 predict0.log; exit 1; }
nnUNetv2_caml_evaluate -ref "$raw/labelsTs" -pred predictions0 -o summary0.json | tail -1
test -s summary0.json

echo "[wheel] converters"
for converter in la2018 cas2023 parse2022 imagecas; do
  nnUNetv2_caml_convert_$converter --help > /dev/null
  # a missing source folder is refused in one line: the converter and its shared module import from the wheel
  if nnUNetv2_caml_convert_$converter -i missing_source -d 130 --labeled 2 2> err.txt; then exit 1; fi
  test "$(wc -l < err.txt)" -eq 1 && grep -q "^ERROR: " err.txt
done
echo "[wheel] smoke test passed"
