"""Multi-GPU CAML (nnU-Net's DDP) for real on the CPU: torch.distributed with the gloo backend, two processes.

* ``pieces``: CAML's synchronisation (memory bank exchange, gradient and buffer averaging, collective decisions) in two
  spawned ranks, on the real classes and the auxiliary network of the test plans, compared with one process.
* ``ddp_runs``: the whole trainer on the tiny dataset of ``conftest.py``: one process trains an epoch
  (``nnUNetv2_train -device cpu``), 2 ranks resume it with ``--c`` through nnU-Net's launcher steps
  (``tests/ddp_on_cpu.py``: nnU-Net's ``run_ddp`` with gloo, final validation included), one process resumes theirs.

What these tests cannot cover, because nnU-Net's DDP path is CUDA-only and this machine has no GPU
(``benchmarks/ddp_check.sh`` runs it on a machine with 2 GPUs): the nccl backend and ``torch.cuda.set_device``;
``DDP(network, device_ids=[rank])`` inside nnU-Net's ``initialize`` (the test trainer wraps the main network the
same way after CAML's set-up, so CAML's set-up sees it unwrapped); SyncBatchNorm (the plans here use InstanceNorm);
autocast and the GradScaler; ``torch.compile`` under DDP; nnU-Net's ``mp.spawn`` from ``nnUNetv2_train -num_gpus 2``;
augmentation workers (``nnUNet_n_proc_DA=0`` here: each rank draws patches in its own process); speed. Not covered
here although it could be: a non-finite step inside a multi-GPU run (only its pieces: the collective decision and
the bank restore of every rank's cases).
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import EXT_TRAINERS_WITH_TESTS, REPO, run_cli
from nnunetv2_caml.checkpoints import CAML_STATE_KEYS, caml_state_digest
from nnunetv2_caml.memory_bank import LabeledMemoryBank

WORLD_SIZE = 2
TRAINER = "nnUNetTrainerCAML_ddpOnCPU"
D = 4  # embedding size of the bank tests


# ---------------------------------------------------------------- the pieces, in two spawned ranks
def _bank_updates(rank: int) -> list:
    """Each rank's chosen updates (case, embeddings, labels), as OCC hands them to the bank: rank 0 stores cases a and
    b, rank 1 cases c and a (a case drawn on both ranks in one step: rank order decides)."""
    torch.manual_seed(rank)  # indices_to_store draws from torch's generator
    generator = torch.Generator().manual_seed(rank)
    bank = LabeledMemoryBank(3, D, entries_per_case=6)
    updates = []
    for case, n in ((("a", 9), ("b", 4)), (("c", 12), ("a", 7)))[rank]:
        embeddings, labels = torch.randn(n, D, generator=generator), torch.randint(0, 3, (n,), generator=generator)
        keep = bank.indices_to_store(labels)
        updates.append((case, embeddings[keep], labels[keep]))
    return updates


def _gradient_steps(rank: int, plans_file: str, configuration: str) -> dict:
    """3 SGD steps of the auxiliary network (without CMA, whose attention mixes a rank's samples) and the OCC heads on
    rank-specific data, initialised differently on each rank, then synchronised as the trainer does."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_caml.distributed import average_buffers, average_gradients, broadcast_from_rank_zero
    from nnunetv2_caml.networks import DecoderFeatures, build_auxiliary_network, feature_channels
    from nnunetv2_caml.occ import OmniCorrelationConsistency

    torch.manual_seed(100 + rank)  # different initial weights: the broadcast must make them equal
    configuration_manager = PlansManager(plans_file).get_configuration(configuration)
    network = build_auxiliary_network(configuration_manager, 1, 2, use_cma=False)
    occ = OmniCorrelationConsistency(feature_channels(network), 2, embedding_dim=8)
    never_used = nn.Parameter(torch.zeros(3))
    broadcast_from_rank_zero([*network.state_dict().values(), *occ.state_dict().values()])
    initial = {k: v.clone() for k, v in network.state_dict().items()}
    features = DecoderFeatures(network)
    parameters = [*network.parameters(), *occ.parameters(), never_used]
    optimizer = torch.optim.SGD(parameters, lr=0.01, momentum=0.99, nesterov=True)
    generator = torch.Generator().manual_seed(rank)
    result = {"initial": initial, "data": []}
    for step in range(3):
        data = torch.randn(1, 1, 16, 16, 16, generator=generator)  # smaller than the patch: fast
        target = torch.randint(0, 2, (1, 16, 16, 16), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(network(data)[0], target)
        voxels = features.pop().flatten(2)[0, :, :64].T.detach()  # the network's gradient: from its own loss only
        loss = loss + occ.prediction_aux(occ.projection_aux(voxels)).square().mean()
        if rank == 1:  # heads a rank leaves out (as OCC does without agreeing voxels) count as zero there
            loss = loss + occ.prediction_main(occ.projection_main(voxels)).square().mean()
        loss.backward()
        if step == 0:
            result["local_gradients"] = [None if p.grad is None else p.grad.clone() for p in parameters]
        average_gradients(parameters)
        average_buffers(list(occ.buffers()))
        if step == 0:
            result["averaged_gradients"] = [None if p.grad is None else p.grad.clone() for p in parameters]
        optimizer.step()
        result["data"].append((data, target))
    result["final"] = {**{f"network.{k}": v for k, v in network.state_dict().items()},
                       **{f"occ.{k}": v for k, v in occ.state_dict().items()}}
    return result


def _pieces_worker(rank: int, world_size: int, port: str, plans_file: str, configuration: str, out: str) -> None:
    from nnunetv2_caml.distributed import broadcast_from_rank_zero, every_rank, on_every_rank, rank_seeds
    from nnunetv2_caml.occ import OmniCorrelationConsistency

    os.environ.update(MASTER_ADDR="localhost", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    result = {}
    # the bank after every rank's updates, and after a step that is undone
    bank = LabeledMemoryBank(3, D, entries_per_case=6)
    bank.store_from_every_rank(_bank_updates(rank))
    result["bank"] = bank.state_dict()
    step_cases = (["b", "d"], ["c"])[rank]  # this rank's labeled cases in a step that turns out non-finite
    snapshot = bank.snapshot([k for keys in every_rank(step_cases) for k in keys])  # as the trainer takes it
    bank.store_from_every_rank([(step_cases[0], torch.full((2, D), float("nan")), torch.tensor([0, 1]))])
    bank.restore(snapshot)
    result["bank_restored"] = bank.state_dict()
    # OCC's update of the bank from different labeled cases, with subsets drawn on each rank
    torch.manual_seed(rank)
    occ = OmniCorrelationConsistency(feature_channels=5, num_classes=2, embedding_dim=D, memory_entries_per_case=10)
    broadcast_from_rank_zero(list(occ.state_dict().values()))
    target = torch.randint(0, 2, (2, 6, 6, 6))
    occ.update_memory(torch.randn(2, 5, 6, 6, 6), torch.randn(2, 5, 6, 6, 6), target, target, target,
                      [f"case_{rank}_0", f"case_{rank}_1"])
    result["occ_bank"] = occ.memory_bank.state_dict()
    result["gradients"] = _gradient_steps(rank, plans_file, configuration)
    result["all_finite"] = on_every_rank(rank == 1, torch.device("cpu"))
    np.random.seed(0)  # seeded alike on every rank, the workers' seeds still differ
    result["worker_seeds"] = rank_seeds(3, rank)
    torch.save(result, os.path.join(out, f"rank_{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def pieces(caml_dataset, tmp_path_factory):
    from nnunetv2.run.run_training import find_free_network_port

    out = tmp_path_factory.mktemp("ddp_pieces")
    plans_file = str(caml_dataset["preprocessed"] / "nnUNetPlans.json")
    mp.spawn(_pieces_worker, args=(WORLD_SIZE, str(find_free_network_port()), plans_file,
                                   caml_dataset["configuration"], str(out)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out / f"rank_{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]


def _assert_banks_equal(a: dict, b: dict) -> None:
    assert list(a["entries"]) == list(b["entries"])  # the same cases in the same storage order
    for case in a["entries"]:
        for x, y in zip(a["entries"][case], b["entries"][case]):
            assert torch.equal(x, y), case


def test_memory_bank_is_identical_on_every_rank_and_equals_one_bank_with_all_updates(pieces):
    _assert_banks_equal(pieces[0]["bank"], pieces[1]["bank"])
    one = LabeledMemoryBank(3, D, entries_per_case=6)
    for rank in range(WORLD_SIZE):  # one process applying both ranks' updates in rank order
        for update in _bank_updates(rank):
            one.store(*update)
    _assert_banks_equal(pieces[0]["bank"], one.state_dict())
    assert sorted(pieces[0]["bank"]["entries"]) == ["a", "b", "c"]
    _, embeddings, labels = _bank_updates(1)[1]  # case a ends with rank 1's entries, on both ranks
    assert torch.equal(pieces[0]["bank"]["entries"]["a"][0], embeddings[labels == 0])


def test_a_skipped_step_is_undone_on_every_rank(pieces):
    for rank in range(WORLD_SIZE):
        _assert_banks_equal(pieces[rank]["bank_restored"], pieces[rank]["bank"])


def test_occ_update_from_different_cases_leaves_identical_banks(pieces):
    _assert_banks_equal(pieces[0]["occ_bank"], pieces[1]["occ_bank"])
    assert sorted(pieces[0]["occ_bank"]["entries"]) == ["case_0_0", "case_0_1", "case_1_0", "case_1_1"]


def test_auxiliary_network_and_heads_are_identical_on_every_rank_after_steps(pieces):
    a, b = pieces[0]["gradients"]["final"], pieces[1]["gradients"]["final"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # weights and the heads' running statistics
    assert a["occ.projection_main.1.running_mean"].abs().sum() > 0  # updated on rank 1 only, then averaged


def test_gradients_are_averaged_as_one_process_would(pieces, caml_dataset):
    local = [p["gradients"]["local_gradients"] for p in pieces]
    averaged = [p["gradients"]["averaged_gradients"] for p in pieces]
    for g0, g1, m0, m1 in zip(*local, *averaged):
        if g0 is None and g1 is None:
            assert m0 is None and m1 is None  # unused everywhere (the unused deep-supervision heads, never_used)
            continue
        mean = ((g0 if g0 is not None else 0) + (g1 if g1 is not None else 0)) / 2
        assert torch.equal(m0, mean) and torch.equal(m1, mean)
    assert local[0][-1] is None and averaged[0][-1] is None  # never_used
    # the auxiliary network's averaged gradient is the gradient of one process on the combined batch, up to float32
    # rounding (computed here in float64: in float32 the combined batch itself differs from float64 by as much)
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_caml.networks import build_auxiliary_network
    configuration_manager = PlansManager(str(caml_dataset["preprocessed"] / "nnUNetPlans.json")).get_configuration(
        caml_dataset["configuration"])
    network = build_auxiliary_network(configuration_manager, 1, 2, use_cma=False)
    network.load_state_dict(pieces[0]["gradients"]["initial"])  # rank 0's, broadcast to rank 1
    data, target = (torch.cat(x) for x in zip(pieces[0]["gradients"]["data"][0], pieces[1]["gradients"]["data"][0]))
    nn.functional.cross_entropy(network.double()(data.double())[0], target).backward()
    scale = max(p.grad.abs().max() for p in network.parameters() if p.grad is not None)
    for p, m in zip(network.parameters(), averaged[0]):
        assert (p.grad is None) == (m is None)
        if p.grad is not None:
            torch.testing.assert_close(m.double(), p.grad, rtol=0, atol=1e-2 * scale)


def test_collective_decisions(pieces):
    assert pieces[0]["all_finite"] is False and pieces[1]["all_finite"] is False  # rank 0 said no
    assert not set(pieces[0]["worker_seeds"]) & set(pieces[1]["worker_seeds"])


# ---------------------------------------------------------------- the trainer, through nnU-Net's launcher steps
def _checkpoint_digest(path: Path) -> str:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    return caml_state_digest(*(checkpoint[k] for k in CAML_STATE_KEYS))


@pytest.fixture(scope="module")
def ddp_runs(caml_dataset, tmp_path_factory):
    """One process trains epoch 0 (``nnUNetv2_train -device cpu``); 2 ranks resume that checkpoint (``--c``) and train
    epoch 1; one process resumes theirs and trains epoch 2. Each run's stdout and checkpoint digest; the ranks'
    reports."""
    d = caml_dataset
    # ranks compute with one thread each; nnUNetv2_train -device cpu uses every core, and its OpenMP threads would
    # spin-wait for cores another process holds (4x the CPU time on a loaded machine)
    env = {**d["env"], "nnUNet_extTrainer": EXT_TRAINERS_WITH_TESTS, "OMP_NUM_THREADS": "1",
           "OMP_WAIT_POLICY": "PASSIVE"}
    output = (d["root"] / "nnUNet_results" / d["dataset_name"] / f"{TRAINER}__nnUNetPlans__{d['configuration']}" /
              "fold_all")
    reports = tmp_path_factory.mktemp("ddp_runs")
    runs = {"output": output, "configuration": d["configuration"]}

    def one_process(name, epochs, *flags):
        result = run_cli(["nnUNetv2_train", d["dataset_id"], d["configuration"], "all", "-tr", TRAINER, "-device",
                          "cpu", *flags], {**env, "CAML_TEST_EPOCHS": str(epochs)})
        runs[name] = {"stdout": result.stdout, "digest": _checkpoint_digest(output / "checkpoint_final.pth")}

    one_process("start", 1)
    result = subprocess.run([sys.executable, str(REPO / "tests" / "ddp_on_cpu.py"), str(d["dataset_id"]),
                             d["configuration"], "all", "-tr", TRAINER, "-num_ranks", str(WORLD_SIZE), "--c",
                             "--report", str(reports)], env={**env, "CAML_TEST_EPOCHS": "2"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs["two_ranks"] = {"stdout": result.stdout, "digest": _checkpoint_digest(output / "checkpoint_final.pth"),
                         "ranks": [torch.load(reports / f"rank_{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]}
    one_process("resumed", 3, "--c")
    return runs


def test_ranks_end_with_identical_networks_heads_and_bank(ddp_runs):
    rank0, rank1 = ddp_runs["two_ranks"]["ranks"]
    for key in ("main_network", "caml_auxiliary_network_weights", "caml_occ_heads"):
        assert rank0[key].keys() == rank1[key].keys()
        for name in rank0[key]:
            assert torch.equal(rank0[key][name], rank1[key][name]), f"{key}.{name}"
    # each update replaces a case's entries: equal banks mean every rank got the other's latest updates
    _assert_banks_equal(rank0["caml_memory_bank"], rank1["caml_memory_bank"])
    drawn = {str(k) for rank in (rank0, rank1) for keys, _ in rank["recorded_steps"] for k in keys}
    assert drawn <= set(rank0["caml_memory_bank"]["entries"])
    # rank 0's checkpoint holds exactly that state
    assert ddp_runs["two_ranks"]["digest"] == caml_state_digest(*(rank1[k] for k in CAML_STATE_KEYS))


def test_each_rank_draws_its_share_of_both_batches_from_its_own_stream(ddp_runs):
    rank0, rank1 = ddp_runs["two_ranks"]["ranks"]
    assert rank0["labeled_batch_size"] == rank1["labeled_batch_size"] == 1  # the plans' batch of 2, split
    for (_, data0), (_, data1) in zip(rank0["unlabeled"], rank1["unlabeled"]):
        assert data0.shape[0] == data1.shape[0] == 1
    assert not all(torch.equal(u0[1], u1[1]) for u0, u1 in zip(rank0["unlabeled"], rank1["unlabeled"]))


def test_log_holds_caml_terms_gathered_from_every_rank(ddp_runs):
    rank0, rank1 = ddp_runs["two_ranks"]["ranks"]
    for key in ("caml_loss_sup_main", "caml_loss_consistency", "caml_loss_occ"):
        assert rank0["logging"][key] == rank1["logging"][key]
        per_rank = [[float(o[key]) for _, o in rank["recorded_steps"]] for rank in (rank0, rank1)]  # epoch 1's steps
        assert per_rank[0] != per_rank[1]
        assert rank0["logging"][key][1] == pytest.approx(np.mean(per_rank), rel=1e-6), key


def test_checkpoints_resume_across_world_sizes(ddp_runs):
    output = ddp_runs["output"]
    # 2 ranks resumed the 1-process checkpoint, each restoring it whole; then one process resumed theirs
    loaded = [line for line in ddp_runs["two_ranks"]["stdout"].splitlines() if "CAML: loaded" in line]
    assert len(loaded) == WORLD_SIZE, loaded
    assert all("at epoch 1:" in line and f"state digest {ddp_runs['start']['digest']}" in line for line in loaded)
    assert (f"CAML: loaded {output / 'checkpoint_final.pth'} at epoch 2:" in ddp_runs["resumed"]["stdout"] and
            f"state digest {ddp_runs['two_ranks']['digest']}" in ddp_runs["resumed"]["stdout"])
    checkpoint = torch.load(output / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["current_epoch"] == 3 and len(checkpoint["logging"]["caml_loss_occ"]) == 3
    for key in ("network_weights", "caml_auxiliary_network_weights"):  # saved unwrapped
        assert not any(k.startswith(("module.", "_orig_mod.")) for k in checkpoint[key]), key
    # nnUNetv2_predict's path: the stock architecture of the plans loads network_weights strictly
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans = PlansManager(str(output.parent / "plans.json"))
    network = nnUNetTrainer.build_network_architecture(plans, plans.get_configuration(ddp_runs["configuration"]),
                                                       1, 2, enable_deep_supervision=False)
    network.load_state_dict(checkpoint["network_weights"], strict=True)
    assert "Validation complete" in ddp_runs["two_ranks"]["stdout"]  # nnU-Net's final validation, split over the ranks
