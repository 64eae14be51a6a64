"""i3d: PyTorch-native I3D video action recognition.

``import i3d`` gives the main entry points; subpackages hold the details:
``i3d.models`` (networks), ``i3d.weights`` (file format and converters), ``i3d.data``
(decoding, sampling, transforms), ``i3d.backends`` (execution), ``i3d.fvd`` (Fréchet Video
Distance: ``i3d.fvd(real, fake)``), ``i3d.cli`` (command line).
"""

__version__ = "0.1.0"

import i3d._torch_env  # noqa: F401  (first: it must run before anything imports torch)
from i3d import fvd  # callable: i3d.fvd(real, fake) is i3d.fvd.api.fvd
from i3d.models import build_model, get_preset, preset_names
from i3d.weights.format import WeightsInfo, load_model, load_weights, read_info, save_weights

__all__ = [
    "WeightsInfo",
    "__version__",
    "build_model",
    "fvd",
    "get_preset",
    "load_model",
    "load_weights",
    "preset_names",
    "read_info",
    "save_weights",
]
