"""Models larger than one device, in four rooms (this module re-exports their names):

- `budget`: sizes and memory budgets (`parse_size`, `parse_max_memory`, `check_max_memory`, `block_bytes`);
- `placement`: where a model goes when it is loaded (`Placement`: device map, budget, disk offload, dtype),
  checked against the machine up front;
- `dispatched`: a dispatched model's execution device, and `onloaded(block)` for layer-wise pruning;
- `mapped`: `release_mapped_pages` for weights that map a checkpoint file.
"""
from __future__ import annotations

from .budget import (UNITS, block_bytes, check_max_memory, execution_key, gram_bytes, meta_model,  # noqa: F401
                     parse_max_memory, parse_size)
from .dispatched import (PRUNED_SUBFOLDER, block_execution_device, execution_device, is_dispatched,  # noqa: F401
                         onloaded)
from .mapped import release_mapped_pages  # noqa: F401
from .placement import WEIGHT_DTYPES, Placement, check_device_map  # noqa: F401
