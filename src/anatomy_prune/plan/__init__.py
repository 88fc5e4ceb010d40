"""The plan stage: PruningPlan (which neurons each layer keeps; plain data, JSON in and out) and the one
allocator that turns scores into a plan."""
from .allocate import check_allocation, keep_counts, plan_from_scores, select
from .plan import PruningPlan, check_sparsity, round_up

__all__ = ["PruningPlan", "check_allocation", "check_sparsity", "keep_counts", "plan_from_scores", "round_up",
           "select"]
