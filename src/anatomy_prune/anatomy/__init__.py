"""The anatomy stage: what layers and FFN neurons do. The first paper's layer and neuron similarity with the
readout token, neuron sets above a threshold and their graph; the second paper's sensitivity and
uniqueness (redundancy) of every neuron."""
from .graphs import graph_stats, neuron_graph
from .measures import (DEFAULT_THRESHOLD, compute_anatomy, layer_similarity, neuron_similarity, neurons_above,
                       readout_states)
from .redundancy import measure, redundancy_of

__all__ = ["DEFAULT_THRESHOLD", "compute_anatomy", "graph_stats", "layer_similarity", "measure", "neuron_graph",
           "neuron_similarity", "neurons_above", "readout_states", "redundancy_of"]
