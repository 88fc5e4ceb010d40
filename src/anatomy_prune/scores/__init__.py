"""The scores stage: the calibration sample and its statistics, and the scorers (one score per FFN neuron,
higher = keep) behind one registry: random, magnitude, activation, the paper's strategy, calibrated.
Importing the package registers the built-in scorers."""
from . import basic, calibrated, fluctuation, strategy  # noqa: F401  (each registers itself in SCORERS)
from .calibration import CALIB_MAX_LENGTH, Calibration, FFNStats, ffn_input_stats, make_calibration
from .registry import SCORERS, Scorer, Scores, check_params, get_scorer, score, scorer_names

__all__ = ["CALIB_MAX_LENGTH", "Calibration", "FFNStats", "SCORERS", "Scorer", "Scores", "check_params",
           "ffn_input_stats", "get_scorer", "make_calibration", "score", "scorer_names"]
