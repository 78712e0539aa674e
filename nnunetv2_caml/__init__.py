"""CAML (Correlation-Aware Mutual Learning) for nnU-Net v2.

Train with ``nnUNetv2_train DATASET CONFIG FOLD -tr nnUNetTrainerCAML`` after
``export nnUNet_extTrainer=$(nnUNetv2_caml_trainers_folder)``. The method is described in docs/method.md.
"""
__version__ = "0.1.0"
