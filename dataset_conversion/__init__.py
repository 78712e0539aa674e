"""Converters from public dataset layouts to nnU-Net v2 raw datasets with ``imagesTrUnlabeled`` (see README.md).

Run a converter as a script (``python dataset_conversion/la2018.py --help``, from any working directory) or
as a module from the repository root (``python -m dataset_conversion.la2018 --help``).
"""
