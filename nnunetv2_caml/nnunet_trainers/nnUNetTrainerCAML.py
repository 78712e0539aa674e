# Thin re-export for nnU-Net's trainer search (export nnUNet_extTrainer=$(nnUNetv2_caml_trainers_folder)).
# The classes live in nnunetv2_caml.trainer and .variants, so they stay importable (and picklable) after nnU-Net
# removes this folder's modules from sys.modules. Define nothing here.
from nnunetv2_caml.trainer import nnUNetTrainerCAML  # noqa: F401
from nnunetv2_caml.variants import *  # noqa: F401,F403
