"""The models stage: load a model by alias / folder / hub id, per-family adapters (where the FFN and the
attention are, which token is read out), physical surgery on projections, the binary classifier, and saved
model folders."""
from .families import (AttentionSite, Family, FFNSite, attention_sites, base_model, family_of, ffn_sites, ffn_widths,
                       get_module, head_counts, weight_out_in)
from .loading import ALIASES, KINDS, Loaded, load_model, max_length_for, pick_device

__all__ = ["ALIASES", "AttentionSite", "FFNSite", "Family", "KINDS", "Loaded", "attention_sites", "base_model",
           "family_of", "ffn_sites", "ffn_widths", "get_module", "head_counts", "load_model", "max_length_for",
           "pick_device", "weight_out_in"]
