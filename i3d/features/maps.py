"""What runs a model up to a feature endpoint: torch on its device, or OpenVINO on the CPU."""

from __future__ import annotations

from collections.abc import Callable

import torch

from i3d.backends.float32 import float32_mode

#: normalised clips (N, C, T, H, W) on the model's device -> the endpoint's maps (N, ...)
EndpointMaps = Callable[[torch.Tensor], torch.Tensor]


def endpoint_maps(
    model: torch.nn.Module, endpoint: str, backend: str = "torch", batch_size: int = 1
) -> EndpointMaps:
    """The function giving ``model``'s ``endpoint`` maps of a batch of clips.

    ``torch`` and ``npu`` run the model where it is, in its dtype; ``openvino`` converts it
    truncated at the endpoint (checked against torch, cached; see
    :func:`~i3d.backends.openvino_backend.endpoint_runner`), ``batch_size`` clips a request
    round. Pooling is left to the caller, in torch, whichever runs the model.
    """
    if backend == "openvino":
        from i3d.backends.openvino_backend import endpoint_runner

        return endpoint_runner(model, endpoint, batch_size).maps
    weight = next(model.parameters())

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), float32_mode(weight.device):  # float32 maps are IEEE float32
            return model.endpoints(x.to(weight.dtype), [endpoint])[endpoint]

    return run
