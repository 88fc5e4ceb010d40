"""Fine-pruning (the second paper): prune FFN neurons while fine-tuning, on the cubic schedule, with
random, magnitude, movement or GUM scores; the end result is physically pruned and saved."""
from .schedule import CubicSchedule
from .train import METHODS, FinepruneConfig, finepruning

__all__ = ["METHODS", "CubicSchedule", "FinepruneConfig", "finepruning"]
