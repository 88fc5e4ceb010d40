"""The pipeline stage: the pruning step that every caller shares (`prune_step`), and the jobs that write
run folders: finetune, anatomy, prune, sweep, redundancy, the latency benchmark and reports."""
from .requests import Allocation, CalibSpec, EvalSpec, PruneRequest, SweepConfig
from .step import PruneResult, prune_step

__all__ = ["Allocation", "CalibSpec", "EvalSpec", "PruneRequest", "PruneResult", "SweepConfig", "prune_step"]
