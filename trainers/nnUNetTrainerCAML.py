# Thin re-export for nnU-Net's trainer search (export nnUNet_extTrainer=<this repo>/trainers).
# The classes live in the installed package nnunetv2_caml, so they stay importable (and picklable) after nnU-Net
# removes this folder's modules from sys.modules. Define nothing here.
from nnunetv2_caml.trainer import nnUNetTrainerCAML  # noqa: F401
from nnunetv2_caml.variants import *  # noqa: F401,F403
