"""Datasets of the size users train, planned by nnU-Net: the 3d_fullres plans the GPU checks measure CAML on.

    python benchmarks/real_plans.py --workdir W --size atrium|vessel [--gpu_memory_target 4 16] [--resenc L] [-np 8]

* ``atrium``: 88x144x144 voxels at 0.625 mm (the cropped LA 2018 scans the semi-supervised papers use), id 721;
* ``vessel``: 200x512x512 voxels at 0.5x0.4x0.4 mm (CT like ImageCAS or Parse 2022), id 722.

Images come from the package's synthetic generator (atrium: 4 labeled and 2 unlabeled scans; vessel: 2 and 1, each
takes half a minute to write). The patch depends on the image size and spacing, not on the number of scans; the batch
is capped by nnU-Net at 5 % of the dataset's voxels, which with so few scans keeps it at nnU-Net's minimum of 2 even
where a larger ``-gpu_memory_target`` would allow more. ``nnUNetv2_plan_and_preprocess`` plans and preprocesses
3d_fullres with nnU-Net's default plans (``nnUNetPlans``, planned for nnU-Net's default GPU memory target) and, for
each ``--gpu_memory_target T``, plans ``nnUNetPlans_T_GB`` made with nnU-Net's own ``-gpu_memory_target T``;
``nnUNetv2_caml_preprocess_unlabeled`` preprocesses the unlabeled scans for each. ``--resenc P`` plans nnU-Net's
ResEnc preset ``nnUNetPlannerResEncP`` (``nnUNetResEncUNetPPlans``; nnU-Net plans M for 8 GB, L for 24 GB, XL for 40
GB), which uses the default plans' preprocessed 3d_fullres data, labeled and unlabeled. Prints the environment to use
and, per plans, the 3d_fullres patch size, batch size and network. Work already done in ``--workdir`` is kept.
"""
import argparse
import json
import os
import subprocess
import sys

from nnunetv2_caml.demo.synthetic import dataset_name, generate_dataset

SIZES = {"atrium": dict(dataset_id=721, task="atrium", shape=(88, 144, 144), spacing=(0.625, 0.625, 0.625),
                        num_labeled=4, num_unlabeled=2),
         "vessel": dict(dataset_id=722, task="vessel", shape=(200, 512, 512), spacing=(0.5, 0.4, 0.4),
                        num_labeled=2, num_unlabeled=1)}


def plans_name(gpu_memory_target) -> str:
    return "nnUNetPlans" if gpu_memory_target is None else f"nnUNetPlans_{gpu_memory_target:g}_GB"


def fullres_configuration(preprocessed: str, plans: str) -> dict:
    """The 3d_fullres configuration of plans ``plans``."""
    with open(os.path.join(preprocessed, f"{plans}.json")) as f:
        return json.load(f)["configurations"]["3d_fullres"]


def describe(plans: str, configuration: dict) -> str:
    """One line: the patch, batch and network of ``configuration`` of plans ``plans``."""
    arch = configuration["architecture"]
    kwargs = arch["arch_kwargs"]
    return (f"{plans:24s} patch {configuration['patch_size']} batch {configuration['batch_size']} "
            f"{arch['network_class_name'].rsplit('.', 1)[-1]} stages {kwargs['n_stages']} "
            f"features {kwargs['features_per_stage']}")


def run(args, env) -> None:
    print("+", " ".join(map(str, args)), flush=True)
    subprocess.run(list(map(str, args)), env=env, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="holds nnUNet_raw and nnUNet_preprocessed")
    parser.add_argument("--size", required=True, choices=sorted(SIZES))
    parser.add_argument("--gpu_memory_target", type=float, nargs="*", default=[],
                        help="also plan with these nnU-Net -gpu_memory_target values (GB)")
    parser.add_argument("--resenc", nargs="*", default=[], choices=("M", "L", "XL"),
                        help="also plan these ResEnc presets of nnU-Net (nnUNetPlannerResEncM, L, XL)")
    parser.add_argument("-np", type=int, default=8, help="processes for preprocessing (default: 8)")
    args = parser.parse_args()
    size = SIZES[args.size]
    workdir = os.path.abspath(args.workdir)
    env = {**os.environ, "nnUNet_raw": os.path.join(workdir, "nnUNet_raw"),
           "nnUNet_preprocessed": os.path.join(workdir, "nnUNet_preprocessed"),
           "nnUNet_results": os.path.join(workdir, "nnUNet_results"),
           # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA): it needs a positive value
           "nnUNet_n_proc_DA": str(max(1, int(os.environ.get("nnUNet_n_proc_DA") or 1)))}
    name = dataset_name(size["dataset_id"], size["task"])
    if not os.path.isdir(os.path.join(env["nnUNet_raw"], name)):
        generate_dataset(env["nnUNet_raw"], size["dataset_id"], task=size["task"], num_labeled=size["num_labeled"],
                         num_unlabeled=size["num_unlabeled"], num_test=0, shape=size["shape"],
                         spacing=size["spacing"], seed=0)
    preprocessed = os.path.join(env["nnUNet_preprocessed"], name)
    summary = []
    for target in [None, *args.gpu_memory_target]:
        plans = plans_name(target)
        if not os.path.isdir(os.path.join(preprocessed, f"{plans}_3d_fullres_unlabeled")):
            extra = [] if target is None else ["-gpu_memory_target", target, "-overwrite_plans_name", plans]
            run(["nnUNetv2_plan_and_preprocess", "-d", size["dataset_id"], "-c", "3d_fullres", "-np", args.np,
                 *extra], env)
            run(["nnUNetv2_caml_preprocess_unlabeled", "-d", size["dataset_id"], "-c", "3d_fullres",
                 "-plans_name", plans, "-np", args.np], env)
        summary.append(describe(plans, fullres_configuration(preprocessed, plans)))
    for preset in args.resenc:
        plans = f"nnUNetResEncUNet{preset}Plans"
        if not os.path.isfile(os.path.join(preprocessed, f"{plans}.json")):
            run(["nnUNetv2_plan_experiment", "-d", size["dataset_id"], "-pl", f"nnUNetPlannerResEnc{preset}"], env)
        configuration = fullres_configuration(preprocessed, plans)
        if configuration["data_identifier"] != "nnUNetPlans_3d_fullres":
            raise SystemExit(f"3d_fullres of {plans} reads {configuration['data_identifier']}, not the default plans' "
                             f"preprocessed data")
        summary.append(describe(plans, configuration))
    print(f"\n{name} ({args.size}: {size['shape']} voxels at {size['spacing']} mm), 3d_fullres:")
    print("\n".join(summary))
    print(f"environment: nnUNet_raw={env['nnUNet_raw']} nnUNet_preprocessed={env['nnUNet_preprocessed']}")


if __name__ == "__main__":
    sys.exit(main())
