"""Keep torch from importing device extensions (torch_npu) behind i3d's back.

torch >= 2.5 imports every ``torch.backends`` entry point at ``import torch``; a torch_npu
without CANN then kills every command, CPU ones included, before i3d can explain. Imported
first by ``i3d/__init__.py``, so the console script, ``python -m i3d`` and spawned workers
(which inherit the environment) import torch with auto-loading off; the npu backend imports
torch_npu itself. An explicit ``TORCH_DEVICE_BACKEND_AUTOLOAD`` is left as it is.
"""

import os
import sys

if "torch" not in sys.modules:
    os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
