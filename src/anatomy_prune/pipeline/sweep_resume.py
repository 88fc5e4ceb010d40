"""Resuming a stopped sweep: the finished rows and plans of its resume file that match the points about to
run, each checked (a resume file is data, never trusted)."""
from __future__ import annotations

from ..errors import UserError
from ..plan.plan import PruningPlan


def resumable(done: dict | None, points: list[dict]) -> tuple[dict | None, dict[int, tuple[dict, dict]]]:
    """The dense row and the finished points {index: (row, plan)} of a stopped sweep that match the points
    about to run (checked, never trusted). `points` lists each row's point index (a Ray sweep finishes
    points out of order); without it (older files) the rows are the first points in order."""
    if not done or not isinstance(done.get("rows"), list) or not isinstance(done.get("plans"), list):
        return None, {}
    rows, plans = done["rows"], done["plans"]
    index = done.get("points", list(range(len(plans))))
    if not rows or not isinstance(index, list) or not len(rows) - 1 == len(plans) == len(index):
        return None, {}
    if not all(isinstance(r, dict) for r in rows) or rows[0].get("method") != "dense":
        return None, {}
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(points) for i in index) \
            or len(set(index)) != len(index):
        return None, {}
    try:
        checked = [PruningPlan.from_dict(p).to_dict() for p in plans]
    except UserError:
        return None, {}
    if any((r.get("method"), r.get("target_sparsity"), r.get("seed"), r.get("label"))
           != (points[i]["method"], points[i]["sparsity"], points[i].get("seed"), points[i]["label"])
           for r, i in zip(rows[1:], index)):
        return None, {}
    if not all(_row_is_sound(r) for r in rows):
        return None, {}
    return rows[0], {i: (r, p) for i, r, p in zip(index, rows[1:], checked)}


def _row_is_sound(row: dict) -> bool:
    """A resumed row's numbers are numbers (a resume file is data, never trusted): the metric, the latency,
    the counts, and per-review correctness as 0/1 when present."""
    def num(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
    metric = "accuracy" if "accuracy" in row else "perplexity"
    if not num(row.get(metric)) or not num(row.get("latency_s")) or not num(row.get("sparsity", 0.0)):
        return False
    for k in ("params", "flops_per_token", "neurons_removed", "n_eval"):
        if k in row and not num(row[k]):
            return False
    correct = row.get("correct")
    return correct is None or (isinstance(correct, list) and all(c in (0, 1) for c in correct))
