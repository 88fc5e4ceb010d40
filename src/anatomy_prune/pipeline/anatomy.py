"""`anatomy-prune anatomy`: the first paper's anatomy of a model on some inputs, written to a run folder.

Files: layer_similarity.json, neuron_similarity.npz (`layer_<i>`: [n_inputs, d_ff]), neurons.json (ids
above the threshold per input and layer), neuron_graph.graphml (anatomy.graphs), summary.json (per-layer
stats over inputs, randomness measures, timings) and figures/ (PNG + PDF), drawn from the saved documents
so that they can be redrawn without the model (`redraw_anatomy_figures`).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..anatomy.graphs import graph_stats, neuron_graph, read_graph, write_graph
from ..anatomy.measures import DEFAULT_THRESHOLD, compute_anatomy
from ..data.texts import resolve_inputs
from ..errors import UserError
from ..models.loading import Loaded, load_model
from ..plotting.anatomy import draw_all
from ..runfolder import RunFolder, now_iso, read_json
from .requests import AnatomyRequest, AnatomySpec

log = logging.getLogger(__name__)


def run_anatomy(loaded: Loaded, texts: Sequence[str], names: Sequence[str] | None, out_dir: str | Path,
                threshold: float = DEFAULT_THRESHOLD, figures: bool = True, progress: bool = True,
                force: bool = False) -> dict:
    """The notebooks' form of measure_anatomy: the default sizes (max_length by the model's rule, batches of 16)."""
    return measure_anatomy(loaded, texts, names, out_dir, AnatomySpec(threshold=threshold, figures=figures),
                           progress=progress, force=force)


def measure_anatomy(loaded: Loaded, texts: Sequence[str], names: Sequence[str] | None, out_dir: str | Path,
                    spec: AnatomySpec | None = None, *, progress: bool = True, force: bool = False) -> dict:
    """Run the anatomy and write `out_dir`; returns summary.json's content."""
    spec = spec or AnatomySpec()
    settings = dict(model=loaded.spec, texts=list(texts), threshold=spec.threshold, max_length=spec.max_length,
                    batch_size=spec.batch_size)
    with RunFolder(out_dir, "anatomy", settings, force=force) as rf:
        return _write_anatomy(rf, loaded, (texts, names), spec, progress, None)


def _write_anatomy(rf: RunFolder, loaded: Loaded, inputs: tuple[Sequence[str], Sequence[str] | None],
                   spec: AnatomySpec, progress: bool, extra: dict | None) -> dict:
    texts, names = inputs
    t0 = time.perf_counter()
    res = compute_anatomy(loaded, texts, names, spec.threshold, spec.max_length, spec.batch_size, progress)
    graph = neuron_graph(res["neurons"]["neurons"], res["sims"], threshold=res["summary"]["threshold"])
    summary = res["summary"]
    summary["graph"] = graph_stats(graph)
    summary.update(extra or {}, created=now_iso())
    rf.write_json("layer_similarity.json", res["layer"])
    np.savez_compressed(rf.stage("neuron_similarity.npz"),
                        **{f"layer_{i}": s.numpy().astype(np.float32) for i, s in enumerate(res["sims"])})
    rf.write_json("neurons.json", res["neurons"])
    write_graph(graph, rf.stage("neuron_graph.graphml"))
    if spec.figures:
        t1 = time.perf_counter()
        draw_all(res["layer"], res["neurons"], summary, graph, rf.stage_dir("figures"))
        summary["figures_s"] = round(time.perf_counter() - t1, 3)
    summary["total_s"] = round(time.perf_counter() - t0, 3)
    rf.write_json("summary.json", summary)
    log.info("anatomy of %s on %d inputs written to %s in %.1f s: %.2f%% of neurons above %.2f on average, "
             "mean pairwise Jaccard %s", loaded.spec, len(texts), rf.path, summary["total_s"],
             100 * (summary["neurons"]["mean_fraction_above"] or 0), summary["threshold"],
             summary["neurons"]["mean_jaccard"])
    return summary


def load_anatomy(run_dir: str | Path) -> dict:
    """Read a folder written by run_anatomy: {"layer", "neurons", "summary", "graph"}."""
    run_dir = Path(run_dir)
    if not (run_dir / "layer_similarity.json").is_file():
        raise UserError(f"'{run_dir}' has no layer_similarity.json; run `anatomy-prune anatomy --out {run_dir}` first")
    graph_file = run_dir / "neuron_graph.graphml"
    return {"layer": read_json(run_dir / "layer_similarity.json"), "neurons": read_json(run_dir / "neurons.json"),
            "summary": read_json(run_dir / "summary.json"),
            "graph": read_graph(graph_file) if graph_file.is_file() else None}


def redraw_anatomy_figures(run_dir: str | Path, folder: str | Path) -> list[Path]:
    """Redraw every anatomy figure of a run folder from its saved files into `folder` (an existing folder
    the caller owns; nothing is written into the run folder)."""
    saved = load_anatomy(run_dir)
    graph = saved["graph"]
    if graph is None:  # an older folder: rebuild the graph from the listed ids
        graph = neuron_graph(saved["neurons"]["neurons"], threshold=saved["neurons"]["threshold"])
    try:
        return draw_all(saved["layer"], saved["neurons"], saved["summary"], graph, folder)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise UserError(f"'{run_dir}' holds anatomy files that cannot be drawn ({type(exc).__name__}); "
                        "run the anatomy again") from None


def anatomy_from_spec(req: AnatomyRequest, out_dir: str | Path, force: bool = False) -> dict:
    """What `anatomy-prune anatomy` does: read the inputs, load the model, measure the anatomy.

    The request was checked when built, so bad arguments fail before the model is loaded and before anything
    is written; max_length follows models.max_length_for's rule."""
    texts, names = resolve_inputs(req.inputs)
    spec = req.spec
    settings = dict(model=req.model, inputs=req.inputs, threshold=spec.threshold, max_length=spec.max_length,
                    batch_size=spec.batch_size)
    with RunFolder(out_dir, "anatomy", settings, force=force) as rf:
        t0 = time.perf_counter()
        loaded = load_model(req.model, device=req.device, dtype=req.dtype)
        load_s = time.perf_counter() - t0
        return _write_anatomy(rf, loaded, (texts, names), spec, True,
                              {"inputs_spec": req.inputs, "load_s": round(load_s, 3)})
