"""anatomy-prune: open transformer language models layer by layer and neuron by neuron, and prune their
feed-forward (FFN) neurons without retraining, into smaller and faster models that save and reload.

The pipeline, one stage per folder (each imports only from the stages before it):
  models, data -> hooks -> train -> anatomy -> scores -> plan -> apply -> evaluate -> plotting -> pipeline
The one pruning step every caller shares is `anatomy_prune.pipeline.prune_step`.
"""
from .errors import UserError
from .models.loading import Loaded, load_model

__version__ = "0.2.0"
__all__ = ["Loaded", "UserError", "load_model", "__version__"]
