"""Neuron graphs: the first paper's presumption that the high-similarity neurons of one layer are fully
connected to those of the next layer (its Figures 2 and 3), as a networkx DiGraph.

Union across inputs: a neuron (layer, id) is a node if its similarity is above the threshold for at least
`min_inputs` inputs (default 1: any input). Node attributes say how many inputs put it there. Edges fully
connect the node set of layer i to the node set of layer i+1 only: an empty layer cuts the graph, which is
how the paper's "dangling" information flow shows. Each edge carries `n_inputs`, the number of inputs for
which both of its ends were above the threshold (the edge exists in that input's own graph), which can be 0
when the two ends were put there by different inputs.

Node ids are strings "L<layer>N<id>" (GraphML has no tuples); the pair is in the `layer` and `neuron` attributes.
Size: with a low threshold the full connections explode (hundreds of nodes per layer give tens of thousands
of edges per gap). When the total would pass `max_edges`, the densest gaps are left unexpanded, largest first,
until the rest fits; they are listed in the graph attribute `gaps_not_expanded` and counted by graph_stats.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import networkx as nx
import numpy as np

from ..errors import UserError

log = logging.getLogger(__name__)
MAX_EDGES = 300_000  # edge budget: past it, the densest gaps are recorded as counts instead of edges


def node_id(layer: int, neuron: int) -> str:
    return f"L{layer}N{neuron}"


def neuron_graph(neuron_sets: Sequence[Sequence[Sequence[int]]], sims: Sequence | None = None,
                 threshold: float | None = None, min_inputs: int = 1, max_edges: int = MAX_EDGES) -> nx.DiGraph:
    """Directed layered graph of above-threshold neurons, unioned over inputs.

    neuron_sets: [input][layer] -> neuron ids (as anatomy.neurons_above returns);
    sims: optional per layer [n_inputs, d_ff] similarities, for each node's mean / max similarity.
    """
    n = len(neuron_sets)
    if min_inputs < 1:
        raise UserError(f"min_inputs must be at least 1, got {min_inputs}")
    n_layers = len(neuron_sets[0]) if n else 0
    g = nx.DiGraph(n_inputs=n, n_layers=n_layers, min_inputs=min_inputs,
                   threshold=float("nan") if threshold is None else float(threshold),
                   rule="node: above threshold for >= min_inputs inputs; edges: full, layer i -> i+1")
    members: list[dict[int, np.ndarray]] = []  # per layer: neuron id -> [n] bool (above for input k)
    for layer in range(n_layers):
        seen: dict[int, np.ndarray] = {}
        for k in range(n):
            for j in neuron_sets[k][layer]:
                seen.setdefault(int(j), np.zeros(n, dtype=bool))[k] = True
        kept = {j: m for j, m in sorted(seen.items()) if m.sum() >= min_inputs}
        members.append(kept)
        for j, m in kept.items():
            attrs = dict(layer=layer, neuron=j, n_inputs=int(m.sum()), fraction_inputs=float(m.mean()))
            if sims is not None:
                col = np.asarray(sims[layer])[:, j]  # [n]
                attrs.update(mean_similarity=float(col.mean()), max_similarity=float(col.max()))
            g.add_node(node_id(layer, j), **attrs)
    full = [len(members[i]) * len(members[i + 1]) for i in range(n_layers - 1)]
    skipped: list[int] = []
    for gap in sorted(range(len(full)), key=lambda i: (-full[i], i)):
        if sum(full) - sum(full[i] for i in skipped) <= max_edges:
            break
        skipped.append(gap)
    if skipped:
        log.warning("neuron graph: %d edges would pass the budget of %d; gaps after layers %s are recorded as "
                    "counts, not edges (raise the threshold for a smaller graph)", sum(full), max_edges, sorted(skipped))
    for layer in range(n_layers - 1):
        a, b = members[layer], members[layer + 1]
        if layer in skipped or not a or not b:
            continue
        ma = np.stack(list(a.values()), axis=1).astype(np.int32)  # [n, |a|]
        mb = np.stack(list(b.values()), axis=1).astype(np.int32)  # [n, |b|]
        both = ma.T @ mb  # [|a|, |b|]: inputs where both ends are above the threshold
        ids_a, ids_b = list(a), list(b)
        g.add_edges_from((node_id(layer, ja), node_id(layer + 1, jb), {"n_inputs": int(both[p, q])})
                         for p, ja in enumerate(ids_a) for q, jb in enumerate(ids_b))
    g.graph["gaps_not_expanded"] = ",".join(map(str, sorted(skipped)))
    return g


def layers_of(g: nx.DiGraph) -> dict[int, list[str]]:
    """Node ids per layer (every layer 0..n_layers-1, empty ones included), sorted by neuron id."""
    out: dict[int, list[str]] = {i: [] for i in range(int(g.graph.get("n_layers", 0)))}
    for node, d in g.nodes(data=True):
        out.setdefault(int(d["layer"]), []).append(node)
    return {i: sorted(v, key=lambda x: int(g.nodes[x]["neuron"])) for i, v in sorted(out.items())}


def graph_stats(g: nx.DiGraph) -> dict:
    """Nodes per layer, edges per gap, empty layers, dangling nodes (no next-layer successor, last layer
    excluded) and weakly connected components."""
    per_layer = layers_of(g)
    n_layers = len(per_layer)
    sizes = [len(per_layer[i]) for i in range(n_layers)]
    skipped = {int(x) for x in str(g.graph.get("gaps_not_expanded", "")).split(",") if x}
    edges = [sizes[i] * sizes[i + 1] if i in skipped else
             sum(1 for u in per_layer[i] for _ in g.successors(u)) for i in range(n_layers - 1)]
    dangling = [u for i in range(n_layers - 1) if i not in skipped for u in per_layer[i] if g.out_degree(u) == 0]
    return {"nodes": g.number_of_nodes(), "edges": int(sum(edges)), "nodes_per_layer": sizes,
            "edges_per_gap": edges, "empty_layers": [i for i, s in enumerate(sizes) if s == 0],
            "dangling": len(dangling), "components": nx.number_weakly_connected_components(g) if len(g) else 0,
            "gaps_not_expanded": sorted(skipped)}


def write_graph(g: nx.DiGraph, path: str | Path) -> Path:
    """GraphML, written as a whole (the caller writes into an atomic folder)."""
    path = Path(path)
    nx.write_graphml(g, path)
    return path


def read_graph(path: str | Path) -> nx.DiGraph:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"graph file '{path}' not found")
    try:
        g = nx.read_graphml(path)
    except Exception as exc:  # malformed XML, wrong format
        raise UserError(f"'{path}' is not a readable GraphML file ({type(exc).__name__})") from None
    return nx.DiGraph(g)
