"""The evaluate stage: accuracy and perplexity with latency, parameter and FLOP counts with the FLOP bound,
and timing that holds on a noisy machine."""
from .counts import count_params, ffn_flops_per_token, flops_per_token, ideal_speedup, size_report
from .metrics import evaluate, evaluate_classifier, evaluation_set, metric_name, perplexity
from .timing import Timing, machine_info, paired_speedup, time_interleaved

__all__ = ["Timing", "count_params", "evaluate", "evaluate_classifier", "ffn_flops_per_token", "flops_per_token",
           "ideal_speedup", "machine_info", "metric_name", "evaluation_set", "paired_speedup", "perplexity", "size_report",
           "time_interleaved"]
