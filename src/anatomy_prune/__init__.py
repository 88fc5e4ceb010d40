"""anatomy-prune: open transformer language models layer by layer and neuron by neuron, and prune their
feed-forward (FFN) neurons without retraining, into smaller and faster models that save and reload."""
from .errors import UserError
from .models import Loaded, load_model

__version__ = "0.1.0"
__all__ = ["Loaded", "UserError", "load_model", "__version__"]
