"""Calibration: statistics gathered by running text through the model layer by layer (imatrix today)."""

from quantkit.calib.imatrix import Imatrix
from quantkit.calib.runner import collect_imatrix, tokenize_file

__all__ = ["Imatrix", "collect_imatrix", "tokenize_file"]
