"""The figures show the data: every plotting function returns a Figure a notebook can restyle, without
empty panels, with axes scaled to the data, titles naming the model (never a run path), variants in
distinct colours and abbreviations spelt out. Synthetic saved results only (no model)."""
import matplotlib
import networkx as nx
import numpy as np
import pytest

matplotlib.use("Agg")
from matplotlib.colors import to_hex  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from anatomy_prune.plotting import model_label  # noqa: E402
from anatomy_prune.plotting.anatomy import plot_fraction_above, plot_jaccard, plot_neuron_graph  # noqa: E402
from anatomy_prune.plotting.display import interval, table_text  # noqa: E402
from anatomy_prune.plotting.latency import plot_speedups  # noqa: E402
from anatomy_prune.plotting.pruning import plot_metric, plot_neurons  # noqa: E402


def _texts(fig: Figure) -> str:
    parts = [fig._suptitle.get_text() if fig._suptitle else ""]
    for ax in fig.axes:
        parts += [ax.get_title(), ax.get_ylabel()] + [t.get_text() for t in ax.texts]
        leg = ax.get_legend()
        parts += [t.get_text() for t in leg.get_texts()] if leg else []
    parts += [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    return "\n".join(parts)


def test_model_label_names_the_model_not_its_folder():
    assert model_label("runs/demo/finetune/model", "minilm", "classifier") == "MiniLM-L6, fine-tuned"
    assert model_label("smollm2") == "SmolLM2-135M"
    assert "runs/" not in model_label("runs/x/model")


def test_jaccard_grid_draws_only_layers_with_neurons():
    n, empty = 3, np.full((3, 3), np.nan)
    full = np.eye(n) * 0 + 0.5
    mats = [empty] * 28 + [full, full]  # 30 layers, two with neurons: the GPT-2 case of the issue
    fig = plot_jaccard(mats, title="GPT-2")
    drawn = [ax for ax in fig.axes if ax.images]
    assert len(drawn) == 2 and [ax.get_title().split(":")[0] for ax in drawn] == ["layer 28", "layer 29"]
    assert "0-27" in fig._suptitle.get_text()


def test_neuron_graph_has_a_row_per_non_empty_layer():
    g = nx.DiGraph(n_layers=30, n_inputs=2)
    for layer, neuron in ((28, 5), (29, 7), (29, 9)):
        g.add_node(f"L{layer}N{neuron}", layer=layer, neuron=neuron, fraction_inputs=1.0)
    g.add_edge("L28N5", "L29N7")
    fig = plot_neuron_graph(g, title="GPT-2")
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["layer 28 (1)", "layer 29 (2)"]
    assert "0-27" in fig.axes[0].get_title()


def _summary(max_share: float) -> dict:
    frac = {k: [max_share / 2, max_share] for k in ("mean", "min", "max", "q10", "q90")}
    jac = {k: [0.5, 0.6] for k in ("mean", "q10", "q90")}
    return {"model": "runs/demo/model", "kind": "classifier", "n_inputs": 10, "threshold": 0.35,
            "neurons": {"fraction_above": frac, "jaccard": jac}}


@pytest.mark.parametrize("max_share", [0.002, 0.04])
def test_share_above_is_scaled_to_the_data(max_share):
    fig = plot_fraction_above(_summary(max_share), model="MiniLM-L6")
    top = fig.axes[0].get_ylim()[1]
    assert 100 * max_share < top < max(100 * max_share * 3, 6)  # percent; the 5% line only when in range
    assert "MiniLM-L6" in _texts(fig) and "runs/" not in _texts(fig)


def _rows():
    base = dict(mode="physical", n_eval=100, latency_s=1.0, neurons_removed_per_layer=[1, 2])
    rows = [dict(base, method="dense", sparsity=0.0, accuracy=0.85)]
    for label, acc in (("paper rule", 0.84), ("uniform per layer", 0.83), ("no focusing layers", 0.82)):
        rows += [dict(base, method="strategy", sparsity=s, accuracy=acc - s / 10, label=label) for s in (0.3, 0.5)]
    return rows


def test_variants_get_distinct_colours_and_dense_is_labelled():
    fig = plot_metric(_rows(), model="MiniLM-L6")
    ax = fig.axes[0]
    colours = {to_hex(c.lines[0].get_color()) for c in ax.containers if hasattr(c, "lines")}
    assert len(colours) == 3
    text = _texts(fig)
    assert "dense" in text and "None" not in text and "MiniLM-L6" in text
    assert isinstance(plot_neurons(_rows(), model="MiniLM-L6", widths=[4, 4]), Figure)


def test_speedup_legend_spells_out_every_variant():
    rows = [dict(device="cpu", batch_size=8, seq_len=128, variant=v, sparsity=s, speedup=1.1, ideal_speedup=1.3,
                 paired_q1=1.0, paired_q3=1.2) for v in ("dense", "mask", "physical", "physical-x8") for s in (0.3, 0.6)]
    text = _texts(plot_speedups({"rows": rows}))
    assert "multiples of 8" in text and "zeroed" in text and "physical-x8" not in text


def test_tables_write_intervals_and_labels():
    assert interval(0.8534, [0.8431, 0.8621]) == "85.3 [84.3-86.2]"
    md, plain = table_text([{"method": "random", "accuracy (%)": interval(0.5, [0.4, 0.6]), "p": None}])
    assert md.splitlines()[0] == "| method | accuracy (%) | p |" and "50.0 [40.0-60.0]" in plain and "None" not in md
