"""The folder to put on ``nnUNet_extTrainer`` (``export nnUNet_extTrainer=$(nnUNetv2_caml_trainers_folder)``).

nnU-Net's trainer search imports every module of that folder as a top-level module and removes them again
afterwards, so the module here only re-exports the trainers; they are defined in ``nnunetv2_caml.trainer`` and
``nnunetv2_caml.variants``.
"""
import os


def trainers_folder() -> str:
    """Absolute path of this folder, for ``nnUNet_extTrainer``."""
    return os.path.dirname(os.path.abspath(__file__))


def print_trainers_folder() -> None:
    """``nnUNetv2_caml_trainers_folder``: print the folder for ``nnUNet_extTrainer``."""
    print(trainers_folder())
