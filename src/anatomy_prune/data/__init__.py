"""The data stage: labelled reviews (IMDB offline or from the hub, user files), splits and the calibration
sample, probes and free text, tokenised batches."""
from .batches import batches, to_device
from .reviews import Splits, TextSet, clean, read_imdb_offline, read_labelled_file, read_texts
from .splits import (CALIB_SIZE, DEFAULT_SIZES, SPLIT_NAMES, calibration_set, dedup, eval_set, load_splits,
                     named_splits, split, take)
from .texts import lm_texts, load_probes, resolve_inputs

__all__ = ["CALIB_SIZE", "DEFAULT_SIZES", "Splits", "TextSet", "batches", "calibration_set", "clean", "eval_set",
           "lm_texts", "load_probes", "load_splits", "read_imdb_offline", "read_labelled_file", "read_texts",
           "resolve_inputs", "split", "to_device", "SPLIT_NAMES", "dedup", "named_splits", "take"]
