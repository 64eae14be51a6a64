"""Model size and cost: parameter counts and FLOPs (counted on the meta device, no compute)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (BN running statistics are buffers and not counted)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: torch.nn.Module, input_shapes: Sequence[Sequence[int]]) -> int:
    """FLOPs of one forward pass (a multiply-add counts 2), measured without real compute.

    ``input_shapes`` holds one shape per positional input of the model.
    """
    import copy

    meta_model = copy.deepcopy(model).to("meta").eval()
    inputs = [torch.empty(tuple(shape), device="meta") for shape in input_shapes]
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta_model(*inputs)
    return int(counter.get_total_flops())
