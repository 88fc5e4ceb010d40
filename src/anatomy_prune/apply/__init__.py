"""The apply stage: a plan masked (zeroed, the paper's way) or physically removed, and least-squares
compensation of what removed neurons contributed, folded into the weights that stay."""
from .compensate import compensate, compensate_layer
from .modes import MODES, apply_plan, check_mode, mask, masked, physical

__all__ = ["MODES", "apply_plan", "check_mode", "compensate", "compensate_layer", "mask", "masked", "physical"]
