"""CAML (Correlation-Aware Mutual Learning) for nnU-Net v2.

Train with ``nnUNetv2_train DATASET CONFIG FOLD -tr nnUNetTrainerCAML`` after pointing
``nnUNet_extTrainer`` at this repository's ``trainers/`` folder.
"""
__version__ = "0.1.0"
