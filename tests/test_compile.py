"""``torch.compile`` of both CAML networks, the way nnU-Net decides it (``benchmarks/compile_check.py``).

nnU-Net never compiles on the CPU, so the CPU test uses a test trainer that says yes there and dynamo's ``aot_eager``
backend: it checks what does not depend on the kernels (both networks compiled by the trainer, one graph each with
the decoder-feature hooks inside, no graph break, no recompilation over 20 steps, eager and compiled losses equal,
checkpoints without the compile prefix). Inductor's kernels and AMP are checked by the CUDA test.
"""
import subprocess
import sys

import pytest
import torch

from conftest import EXT_TRAINERS_WITH_TESTS, REPO


def compile_check(d, trainer, device, *extra):
    env = {**d["env"], "nnUNet_extTrainer": EXT_TRAINERS_WITH_TESTS}
    env.pop("nnUNet_compile")  # nnU-Net's default decides
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "compile_check.py"), "-d", str(d["dataset_id"]),
                             "-c", d["configuration"], "-f", "all", "-tr", trainer, "-device", device, "-n", "20",
                             *extra], env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "compile check passed" in result.stdout
    return result.stdout


def test_both_networks_compile_without_graph_breaks_or_recompiles_on_cpu(caml_dataset):
    out = compile_check(caml_dataset, "nnUNetTrainerCAML_compileOnCPU", "cpu", "--backend", "aot_eager")
    assert "compiled trainer: main network compiled True, auxiliary network compiled True" in out
    assert "eager trainer: main network compiled False, auxiliary network compiled False" in out
    assert "graph breaks 0" in out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: inductor kernels with AMP")
def test_caml_compiles_like_nnunet_on_cuda(caml_dataset):
    out = compile_check(caml_dataset, "nnUNetTrainerCAML", "cuda")
    assert "compiled trainer: main network compiled True, auxiliary network compiled True" in out
