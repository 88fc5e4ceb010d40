"""Anatomy: layer and neuron similarity against hand computations, exact threshold listings, the neuron graph,
the run folder (files, atomicity, bad input) and the CLI, on tiny models of every family."""
from __future__ import annotations

import json
import logging
import math

import networkx as nx
import numpy as np
import pytest
import torch

from anatomy_prune import UserError
from anatomy_prune.anatomy.graphs import graph_stats, layers_of, neuron_graph, read_graph, write_graph
from anatomy_prune.anatomy.measures import (check_threshold, compute_anatomy, jaccard_matrices, layer_similarity,
                                            neuron_similarity, neurons_above, randomness, readout_pass,
                                            readout_states)
from anatomy_prune.cli import main
from anatomy_prune.hooks import final_norm_name, hook_points, run_with_hooks
from anatomy_prune.models.families import base_model
from anatomy_prune.pipeline.anatomy import measure_anatomy, redraw_anatomy_figures, run_anatomy
from anatomy_prune.pipeline.requests import AnatomyRequest, AnatomySpec

from conftest import TEXTS, capture_ffn_hidden, make_classifier

FILES = {"layer_similarity.json", "neuron_similarity.npz", "neurons.json", "neuron_graph.graphml", "summary.json"}
FIGURES = ("layer_similarity", "layer_similarity_spread", "neuron_graph", "jaccard", "fraction_above")


def _outputs(folder) -> set[str]:
    """A run folder's entries, without its hidden marker and lock."""
    return {p.name for p in folder.iterdir() if not p.name.startswith(".anatomy-prune")}


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _down_columns(loaded, layer: int) -> np.ndarray:
    """Neuron output vectors read straight from each family's weights, by hand: [d_ff, d_model]."""
    base = base_model(loaded.model)
    fam = loaded.family.name
    if fam == "bert":
        return base.encoder.layer[layer].output.dense.weight.detach().double().numpy().T  # Linear [d, d_ff]
    if fam == "gpt2":
        return base.h[layer].mlp.c_proj.weight.detach().double().numpy()  # Conv1D stores [d_ff, d]: rows
    return base.layers[layer].mlp.down_proj.weight.detach().double().numpy().T  # Linear [d, d_ff]


# --- similarities against hand computations ------------------------------------------------------

def test_layer_similarity_matches_hand_computation(tiny):
    text = TEXTS[0]
    enc = tiny.tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        hidden = base_model(tiny.model)(**enc, output_hidden_states=True).hidden_states
    pos = 0 if tiny.family.readout == "cls" else enc["input_ids"].shape[1] - 1
    vecs = [h[0, pos].double().numpy() for h in hidden]
    expected = [_cos(v, vecs[-1]) for v in vecs]

    # in a padded batch with a longer and a shorter neighbour, so the readout position matters
    states = readout_states(tiny, [TEXTS[3], text, TEXTS[2]], max_length=64, batch_size=3)
    sim = layer_similarity(states)
    assert sim.shape == (3, len(hidden))
    np.testing.assert_allclose(sim[1].numpy(), expected, atol=1e-5)
    torch.testing.assert_close(sim[:, -1], torch.ones(3))
    np.testing.assert_allclose(states[1].numpy(), np.stack(vecs), atol=1e-4)  # the right token of every layer


def test_neuron_similarity_matches_hand_computation(tiny):
    states = readout_states(tiny, TEXTS[:2], max_length=64)
    final = states[:, -1]  # [2, d]
    sims = neuron_similarity(tiny, final)
    assert len(sims) == 3 and all(s.shape == (2, 37) for s in sims)
    for layer in (0, 2):
        cols = _down_columns(tiny, layer)  # [d_ff, d]
        assert cols.shape == (37, 32)
        for k in range(2):
            for j in (0, 5, 36):
                assert sims[layer][k, j].item() == pytest.approx(_cos(cols[j], final[k].double().numpy()), abs=1e-5)


def test_decoders_record_the_state_before_the_final_norm(tiny):
    states, pre = readout_pass(tiny, TEXTS[:2], max_length=64)
    if not tiny.family.decoder:
        assert pre is None
        return
    assert pre.shape == (2, 32)
    norm = base_model(tiny.model).ln_f if tiny.family.name == "gpt2" else base_model(tiny.model).norm
    with torch.no_grad():
        torch.testing.assert_close(norm(pre), states[:, -1], atol=1e-5, rtol=1e-5)


# --- exact threshold listings and randomness measures --------------------------------------------

def test_threshold_is_strict_and_exact_on_given_similarities():
    sims = [torch.tensor([[0.36, 0.35, 0.1, -0.9], [0.9, 0.2, 0.351, 0.0]]),
            torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.34, 0.5]])]  # a pruned layer may be narrower
    assert neurons_above(sims, 0.35) == [[[0], []], [[0, 2], [0, 2]]]
    assert neurons_above(sims, -0.5) == [[[0, 1, 2], [0, 1, 2]], [[0, 1, 2, 3], [0, 1, 2]]]


def _set_output_vectors(loaded, layer: int, vecs: torch.Tensor) -> None:
    """Write neuron output vectors [d_ff, d] into the family's own weight layout."""
    base = base_model(loaded.model)
    with torch.no_grad():
        if loaded.family.name == "bert":
            base.encoder.layer[layer].output.dense.weight.copy_(vecs.t())
        elif loaded.family.name == "gpt2":
            base.h[layer].mlp.c_proj.weight.copy_(vecs)
        else:
            base.layers[layer].mlp.down_proj.weight.copy_(vecs.t())


def test_threshold_listing_is_exact_on_a_constructed_model(tiny):
    d, d_ff = 32, 37
    e = torch.eye(d)
    vecs = torch.stack([e[2 + j % (d - 2)] for j in range(d_ff)])  # orthogonal to e0 and e1: cosine 0
    vecs[2] = vecs[11] = e[0] + 0.5 * e[1]   # cos 0.894 with e0, 0.447 with e1
    vecs[5] = 0.3 * e[0] + e[1]              # cos 0.287 with e0, 0.958 with e1
    vecs[20] = -e[0]                         # cos -1 with e0: never listed
    _set_output_vectors(tiny, 1, vecs)
    final = torch.stack([e[0], e[1]])  # two "inputs"
    sims = neuron_similarity(tiny, final)
    listed = neurons_above(sims, 0.35)
    assert listed[0][1] == [2, 11]
    assert listed[1][1] == [2, 5, 11]
    assert sims[1][0, 20].item() == pytest.approx(-1.0)


def test_randomness_measures_by_hand():
    sets = [[[1, 2], [], [0]], [[2, 3], [], [0]], [[2], [4], [0]]]  # [input][layer]
    r = randomness(sets, widths=[4, 10, 2])
    assert r["fraction_above"]["mean"] == pytest.approx([(0.5 + 0.5 + 0.25) / 3, 0.1 / 3, 0.5], abs=1e-6)
    assert r["union_size"] == [3, 1, 1] and r["core"] == [[2], [], [0]]
    m0 = jaccard_matrices(sets)[0]
    assert m0[0, 1] == pytest.approx(1 / 3) and m0[0, 2] == pytest.approx(0.5) and m0[1, 2] == pytest.approx(0.5)
    assert r["jaccard"]["mean"][0] == pytest.approx((1 / 3 + 0.5 + 0.5) / 3, abs=1e-6)
    # layer 1: the pair (0, 1) is empty on both sides and left out; the other two pairs share nothing
    assert r["jaccard_both_empty"] == [0, 1, 0] and r["jaccard"]["mean"][1] == 0.0
    assert r["jaccard"]["mean"][2] == 1.0
    assert r["layers_over_paper_fraction"] == [0, 2]


@pytest.mark.parametrize("bad", [1.5, -1.01, float("nan"), "x"])
def test_threshold_outside_the_cosine_range(bad):
    with pytest.raises(UserError, match="threshold"):
        check_threshold(bad)


# --- graph ----------------------------------------------------------------------------------------

def test_graph_unions_inputs_and_fully_connects_consecutive_layers(tmp_path):
    sets = [[[1, 2], [5], [], [7]],
            [[2], [5, 6], [], [7]]]
    g = neuron_graph(sets, threshold=0.35)
    assert sorted(g.nodes) == ["L0N1", "L0N2", "L1N5", "L1N6", "L3N7"]
    assert sorted(g.edges) == [("L0N1", "L1N5"), ("L0N1", "L1N6"), ("L0N2", "L1N5"), ("L0N2", "L1N6")]
    assert g.nodes["L0N2"]["n_inputs"] == 2 and g.nodes["L0N1"]["n_inputs"] == 1
    assert g.edges["L0N2", "L1N5"]["n_inputs"] == 2 and g.edges["L0N1", "L1N6"]["n_inputs"] == 0
    st = graph_stats(g)
    assert st["nodes_per_layer"] == [2, 2, 0, 1] and st["edges_per_gap"] == [4, 0, 0]
    assert st["empty_layers"] == [2] and st["dangling"] == 2 and st["components"] == 2
    back = read_graph(write_graph(g, tmp_path / "g.graphml"))
    assert set(back.edges) == set(g.edges) and back.nodes["L0N2"]["layer"] == 0
    assert back.nodes["L1N6"]["neuron"] == 6 and back.graph["n_inputs"] == 2
    strict = neuron_graph(sets, min_inputs=2)
    assert sorted(strict.nodes) == ["L0N2", "L1N5", "L3N7"] and list(strict.edges) == [("L0N2", "L1N5")]


def test_graph_edge_budget_leaves_the_densest_gap_as_a_count():
    sets = [[[0, 1, 2, 3], [0, 1, 2, 3], [0, 1]]]
    g = neuron_graph(sets, max_edges=10)
    assert g.number_of_edges() == 8 and g.graph["gaps_not_expanded"] == "0"
    st = graph_stats(g)
    assert st["edges_per_gap"] == [16, 8] and st["edges"] == 24 and st["gaps_not_expanded"] == [0]
    assert neuron_graph(sets).number_of_edges() == 24


# --- the run folder ---------------------------------------------------------------------------------

def test_run_anatomy_writes_consistent_files(tmp_path):
    loaded = make_classifier("tiny-gpt2")  # a classifier kind, GPT-2's Conv1D
    names = [f"t{i}" for i in range(len(TEXTS))]
    out = tmp_path / "anat"
    summary = measure_anatomy(loaded, TEXTS, names, out, AnatomySpec(threshold=0.2, max_length=32, figures=False),
                              progress=False)
    assert _outputs(out) == FILES
    layer = json.loads((out / "layer_similarity.json").read_text())
    assert layer["names"] == names and layer["inputs"] == TEXTS and layer["model"] == "tiny-gpt2"
    sim = np.array(layer["similarity"])
    assert sim.shape == (4, 4) and np.allclose(sim[:, -1], 1.0)
    npz = np.load(out / "neuron_similarity.npz")
    assert sorted(npz.files) == ["layer_0", "layer_1", "layer_2"] and npz["layer_1"].shape == (4, 37)
    neurons = json.loads((out / "neurons.json").read_text())
    for k in range(4):
        for i in range(3):
            assert neurons["neurons"][k][i] == np.flatnonzero(npz[f"layer_{i}"][k] > 0.2).tolist()
    g = read_graph(out / "neuron_graph.graphml")
    per_layer = layers_of(g)
    for i in range(2):  # edges fully connect consecutive non-empty sets, and nothing else
        a, b = set(per_layer[i]), set(per_layer[i + 1])
        assert {(u, v) for u, v in g.edges if u in a} == {(u, v) for u in a for v in b}
    assert summary["n_inputs"] == 4 and summary["graph"]["nodes"] == g.number_of_nodes()
    in_memory = compute_anatomy(loaded, TEXTS, names, threshold=0.2, max_length=32, progress=False)
    assert in_memory["neurons"]["neurons"] == neurons["neurons"]
    np.testing.assert_allclose(in_memory["sims"][1].numpy(), npz["layer_1"], atol=1e-6)
    assert json.loads((out / "summary.json").read_text())["neurons"]["union_size"] == [len(per_layer[i]) for i in range(3)]


def test_pruned_model_with_per_layer_widths(tmp_path):
    from anatomy_prune.apply import physical
    from anatomy_prune.plan import PruningPlan

    loaded = make_classifier("tiny-llama")
    keep = [list(range(0, 37, 2)), list(range(37)), [3, 7, 30]]
    physical(loaded.model, PruningPlan(keep=keep, widths=[37, 37, 37]))
    s = measure_anatomy(loaded, TEXTS, None, tmp_path / "p", AnatomySpec(threshold=0.1, max_length=32, figures=False),
                        progress=False)
    npz = np.load(tmp_path / "p" / "neuron_similarity.npz")
    assert [npz[f"layer_{i}"].shape for i in range(3)] == [(4, 19), (4, 37), (4, 3)]
    assert s["d_ff"] == [19, 37, 3]
    counts = [[len(npz[f"layer_{i}"][k][npz[f"layer_{i}"][k] > 0.1]) for i in range(3)] for k in range(4)]
    np.testing.assert_allclose(s["neurons"]["fraction_above"]["mean"],
                               (np.array(counts) / [19, 37, 3]).mean(axis=0), atol=1e-6)


def test_figures_redraw_from_saved_files_without_a_model(tmp_path, monkeypatch):
    loaded = make_classifier("tiny-bert")
    out = tmp_path / "anat"
    run_anatomy(loaded, TEXTS, None, out, threshold=0.2, figures=False, progress=False, force=True)  # notebooks' form
    assert not (out / "figures").exists()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    import anatomy_prune.models.loading as loading
    import anatomy_prune.pipeline.anatomy as job
    for mod in (loading, job):
        monkeypatch.setattr(mod, "load_model", lambda *a, **k: pytest.fail("redraw must not load a model"))
    figs = tmp_path / "figs"
    figs.mkdir()
    written = redraw_anatomy_figures(out, figs)
    assert sorted(p.stem for p in written) == sorted(FIGURES)
    for name in FIGURES:
        assert (figs / f"{name}.png").stat().st_size > 1000
        assert (figs / f"{name}.pdf").is_file()
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing written into the run
    with pytest.raises(UserError, match="layer_similarity.json"):
        redraw_anatomy_figures(figs, tmp_path)


def test_figures_drawn_by_the_run(tmp_path):
    out = tmp_path / "anat"
    measure_anatomy(make_classifier("tiny-gpt2"), TEXTS, None, out, AnatomySpec(threshold=0.2, max_length=32),
                    progress=False)
    assert _outputs(out) == FILES | {"figures"}
    assert sorted(p.name for p in (out / "figures").glob("*.png")) == sorted(f"{n}.png" for n in FIGURES)


def test_long_inputs_are_truncated_with_a_warning(tmp_path, caplog):
    loaded = make_classifier("tiny-llama")
    texts = [TEXTS[0], " ".join(TEXTS * 5), TEXTS[1]]
    with caplog.at_level(logging.WARNING, logger="anatomy_prune.anatomy.measures"):
        s = measure_anatomy(loaded, texts, None, tmp_path / "a", AnatomySpec(max_length=12, figures=False),
                            progress=False)
    assert "1 of 3 inputs are longer than 12 tokens" in caplog.text
    assert s["n_truncated"] == 1
    assert json.loads((tmp_path / "a" / "layer_similarity.json").read_text())["truncated"] == [1]


def test_bad_input_writes_nothing(tmp_path, monkeypatch):
    loaded = make_classifier("tiny-bert")
    with pytest.raises(UserError, match="threshold"):
        run_anatomy(loaded, TEXTS, None, tmp_path / "a", threshold=1.2)
    with pytest.raises(UserError, match="no inputs"):
        run_anatomy(loaded, [], None, tmp_path / "a")
    with pytest.raises(UserError, match="max-length"):
        measure_anatomy(loaded, TEXTS, None, tmp_path / "a", AnatomySpec(max_length=10_000))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="current or a parent folder"):
        measure_anatomy(loaded, TEXTS, None, tmp_path / "..", AnatomySpec(max_length=32), progress=False)
    # a failure half-way (here: while drawing) leaves neither the folder nor a temporary one behind
    import anatomy_prune.plotting.anatomy as plots
    monkeypatch.setattr(plots, "plot_jaccard", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        measure_anatomy(loaded, TEXTS, None, tmp_path / "a", AnatomySpec(max_length=32), progress=False)
    assert list(tmp_path.iterdir()) == []


# --- named hook points -----------------------------------------------------------------------------

def test_run_with_hooks_observes_edits_and_always_removes(tiny):
    enc = tiny.tokenizer(TEXTS[:2], return_tensors="pt", padding=True)
    base = base_model(tiny.model)
    points = hook_points(tiny.model)
    assert {"ffn.0.hidden", "ffn.1.hidden", "ffn.2.hidden", "model.input"} <= set(points)
    assert ("final_norm.input" in points) == tiny.family.decoder
    assert final_norm_name(tiny.model) == {"bert": None, "gpt2": "ln_f", "llama": "norm"}[tiny.family.name]
    with torch.no_grad():
        dense = base(**enc).last_hidden_state
    seen, kwargs = [], []
    zero_layer_1 = lambda x, point: torch.zeros_like(x) if point == "ffn.1.hidden" else None  # noqa: E731
    with torch.no_grad(), run_with_hooks(tiny.model, {"ffn.*.hidden": [lambda x, p: seen.append((p, x.shape)),
                                                                       zero_layer_1],
                                                      "model.input": lambda kw, p: kwargs.append(sorted(kw))}):
        edited = base(**enc).last_hidden_state
    assert [p for p, _ in seen] == ["ffn.0.hidden", "ffn.1.hidden", "ffn.2.hidden"]
    assert all(shape == (*enc["input_ids"].shape, 37) for _, shape in seen)
    assert "input_ids" in kwargs[0] and "attention_mask" in kwargs[0]
    assert not torch.allclose(edited, dense)
    # the edit is exactly "layer 1's down projection receives zeros": the same as zeroing its weight
    import copy
    from anatomy_prune.models.families import ffn_sites, get_module, weight_out_in
    twin = copy.deepcopy(tiny.model)
    with torch.no_grad():
        weight_out_in(get_module(base_model(twin), ffn_sites(twin)[1].down)).zero_()
        torch.testing.assert_close(base_model(twin)(**enc).last_hidden_state, edited, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(base(**enc).last_hidden_state, dense)  # removed after the block
    with pytest.raises(RuntimeError), run_with_hooks(tiny.model, {"ffn.0.hidden": zero_layer_1}):
        raise RuntimeError("boom")
    with torch.no_grad():
        torch.testing.assert_close(base(**enc).last_hidden_state, dense)  # removed after an exception too
    with pytest.raises(KeyError, match="ffn.9.hidden"), run_with_hooks(tiny.model, {"ffn.9.hidden": zero_layer_1}):
        pass


def test_capture_ffn_hidden_reduces_per_layer(tiny):
    enc = tiny.tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad(), capture_ffn_hidden(tiny.model) as full, \
            capture_ffn_hidden(tiny.model, reduce=lambda x: x.abs().sum()) as sums:
        base_model(tiny.model)(**enc)
        base_model(tiny.model)(**enc)
    assert [len(a) for a in full] == [2, 2, 2] and full[0][0].shape == (*enc["input_ids"].shape, 37)
    for layer in range(3):
        assert sums[layer][1].item() == pytest.approx(full[layer][1].abs().sum().item(), rel=1e-5)


# --- CLI ------------------------------------------------------------------------------------------------

def test_cli_anatomy_on_a_text_file(tmp_path, capsys):
    inputs = tmp_path / "in.txt"
    inputs.write_text("\n".join(TEXTS[:3]) + "\n\n")
    out = tmp_path / "out"
    assert main(["anatomy", "--model", "tiny-gpt2", "--out", str(out), "--inputs", str(inputs),
                 "--threshold", "0.3", "--max-length", "32", "--no-figures"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["n_inputs"] == 3 and len(printed["layer_similarity_mean"]) == 4
    assert _outputs(out) == FILES
    assert json.loads((out / "neurons.json").read_text())["threshold"] == 0.3
    assert json.loads((out / "summary.json").read_text())["inputs_spec"] == str(inputs)


@pytest.mark.parametrize("args,message", [
    (["--threshold", "1.5"], "threshold"),
    (["--inputs", "EMPTY"], "has no text"),
    (["--inputs", "MISSING"], "not found"),
    (["--batch-size", "0"], "batch-size"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    (tmp_path / "empty.txt").write_text("\n  \n")
    args = [{"EMPTY": str(tmp_path / "empty.txt"), "MISSING": str(tmp_path / "nope.txt")}.get(a, a) for a in args]
    out = tmp_path / "out"
    assert main(["anatomy", "--model", "tiny-bert", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0
    assert not out.exists()


@pytest.mark.slow
def test_minilm_anatomy_on_the_probes(tmp_path):
    from anatomy_prune.pipeline.anatomy import anatomy_from_spec

    s = anatomy_from_spec(AnatomyRequest("minilm", spec=AnatomySpec(figures=False)), tmp_path / "m")
    assert s["n_inputs"] == 10 and s["n_layers"] == 6
    assert s["layer_similarity"]["mean"][-1] == pytest.approx(1.0)
    assert math.isfinite(s["neurons"]["mean_fraction_above"])
