"""The models stage: load a model by alias / folder / hub id, per-family adapters (where the FFN is, which
token is read out), physical surgery on projections, the binary classifier, and saved model folders."""
from .families import Family, FFNSite, base_model, family_of, ffn_sites, ffn_widths, get_module, weight_out_in
from .loading import ALIASES, KINDS, Loaded, load_model, max_length_for, pick_device

__all__ = ["ALIASES", "FFNSite", "Family", "KINDS", "Loaded", "base_model", "family_of", "ffn_sites", "ffn_widths",
           "get_module", "load_model", "max_length_for", "pick_device", "weight_out_in"]
