"""Calibration: statistics gathered by running text through the model layer by layer (imatrix today)."""

from quantkit.calib.data import tokenize_file
from quantkit.calib.imatrix import Imatrix
from quantkit.calib.runner import collect_imatrix

__all__ = ["Imatrix", "collect_imatrix", "tokenize_file"]
