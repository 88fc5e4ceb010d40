"""`anatomy-prune redundancy`: the second paper's sensitivity and uniqueness of every FFN neuron of a model
(a pruned folder included), or of a model after physically applying a plan, into a run folder."""
from __future__ import annotations

from pathlib import Path

from ..anatomy.redundancy import redundancy_of, summary
from ..apply.modes import physical
from ..finepruning.train import FinepruneConfig, as_task_model, make_task
from ..models.loading import load_model
from ..plan.plan import PruningPlan
from ..runfolder import RunFolder, now_iso


def redundancy_job(out: str | Path, cfg: FinepruneConfig, plan_file: str | None = None, device: str | None = None,
                   progress: bool = True, figures: bool = True, force: bool = False, dtype: str | None = None) -> dict:
    """Sensitivity and uniqueness of cfg.model's neurons on the task's analysis examples; writes
    DIR/redundancy.json and a figure."""
    cfg.validate()
    spec = cfg.model
    plan = PruningPlan.load(plan_file) if plan_file else None
    settings = {"model": spec, "plan": plan.to_dict() if plan else None, "task": cfg.task, "text": cfg.text,
                "data": cfg.data, "batch_size": cfg.batch_size, "max_length": cfg.max_length,
                "train_size": cfg.train_size, "eval_size": cfg.eval_size, "analysis_size": cfg.analysis_size,
                "seed": cfg.seed}
    with RunFolder(out, "redundancy", settings, force=force) as rf:
        loaded = as_task_model(load_model(spec, device=device, dtype=dtype), cfg.task, cfg.seed)
        if plan is not None:
            plan.check_fits(loaded.model)
        task, _held_out = make_task(loaded, cfg)
        if plan is not None:
            physical(loaded.model, plan)
        red = redundancy_of(loaded.model, task, cfg.analysis_size, progress=progress)
        red.update(model=spec, plan=plan_file, task=cfg.task, created=now_iso())
        rf.write_json("redundancy.json", red)
        if figures:
            from ..plotting.redundancy import plot_per_layer
            plot_per_layer({Path(spec).name or spec: {"redundancy": summary(red),
                                                      "kept_widths": [lay["width"] for lay in red["layers"]]}},
                           rf.stage_dir("figures"))
    return red
