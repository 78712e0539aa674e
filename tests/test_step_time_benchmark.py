"""``benchmarks/step_time.py`` runs on real plans and prints one row per trainer with its ratios, and with
``--profile`` where the CAML step's time goes."""
import re
import subprocess
import sys

from conftest import REPO


def test_step_time_prints_each_trainer_against_stock(caml_dataset):
    d = caml_dataset
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "step_time.py"), "-d", str(d["dataset_id"]),
                             "-c", d["configuration"], "-f", "all", "-p", "nnUNetPlans", "-n", "2", "--warmup", "1",
                             "-device", "cpu", "-tr", "nnUNetTrainer", "nnUNetTrainerCAML_noCMA",
                             "nnUNetTrainerCAML_pointwiseUpsampling", "--profile", "1"],
                            env={**d["env"], "nnUNet_n_proc_DA": "1"}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()
            if line.startswith("nnUNetTrainer")}
    assert set(rows) == {"nnUNetTrainer", "nnUNetTrainerCAML_noCMA", "nnUNetTrainerCAML_pointwiseUpsampling"}
    median, _, vs_stock, vs_floor = map(float, rows["nnUNetTrainerCAML_noCMA"][:4])
    assert median > 0 and float(rows["nnUNetTrainer"][2]) == 1.0
    assert abs(vs_floor - vs_stock / 4) < 0.01
    # two networks on twice the patches, the auxiliary one with interpolation upsampling (+3x3x3 conv) in its decoder:
    # more than 4 x stock's FLOPs; the FLOP floor ratio is the time ratio over that
    flops, vs_flop_floor = map(float, rows["nnUNetTrainerCAML_noCMA"][4:6])
    assert 4.5 < flops < 5.5 and float(rows["nnUNetTrainer"][4]) == 1.0
    assert abs(vs_flop_floor - vs_stock / flops) < 0.01
    # with a 1x1x1 convolution after the interpolation the auxiliary network costs about the main one (CMA included)
    assert 3.9 < float(rows["nnUNetTrainerCAML_pointwiseUpsampling"][4]) < 4.4
    assert "plans nnUNetPlans 3d_cpu" in result.stdout
    # the augmentation workers (labeled and validation loaders; CAML's unlabeled loader too) were stopped before the
    # clock started, so they take no CPU time from the timed steps
    workers = re.search(r"augmentation workers stopped: (\d+) (\d+) (\d+) processes", result.stdout)
    assert workers, result.stdout[-3000:]
    stock, *caml = map(int, workers.groups())
    assert stock > 0 and all(n > stock for n in caml)
    # and every trainer allocated with the same fixed malloc thresholds (glibc), whatever ran before it
    assert "glibc's malloc thresholds fixed for all trainers alike" in result.stdout
    # the warm-up steps' time per trainer, with the graphs inductor compiled: none, nnU-Net does not compile on the CPU
    warmup = {line.split()[1]: line.split()[2:] for line in result.stdout.splitlines() if line.startswith("warm-up ")}
    assert set(warmup) == set(rows) and all(float(w[0]) > 0 and w[1:] == ["0", "/", "0"] for w in warmup.values())
    # the profile names every part of the CAML step (record_function in train_step), with its host time
    profile = result.stdout.split("== profile of nnUNetTrainerCAML_noCMA, 1 steps")[1]
    parts = {line[:28].strip(): float(line.split()[-1]) for line in profile.splitlines() if line.startswith("CAML ")}
    assert set(parts) == {"CAML main network", "CAML auxiliary network", "CAML supervised loss",
                          "CAML mutual consistency", "CAML OCC", "CAML backward", "CAML optimizer step"}
    assert all(ms > 0 for ms in parts.values())
    assert "== profile of nnUNetTrainer, 1 steps" in result.stdout
