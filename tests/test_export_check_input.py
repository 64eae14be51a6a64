"""Export verification feeds natural frames, so realistic non-local models can be checked."""

from __future__ import annotations

import pytest
import torch

from i3d.backends.check_input import natural_clips, natural_clips_for, sample_frames
from i3d.models import build_model, get_preset
from i3d.weights.mmaction import extract_state_dict
from i3d.weights.preprocessing import Preprocessing
from i3d.weights.safe_pickle import load_checkpoint

NL_SCALE = 9  # non-local conv weights ×9: noise overflows the cubic NL term, video does not


def _loud_nonlocal_model(reference):
    """The mmaction NL-dot-product fixture (eval_stable) with stronger non-local blocks."""
    base = reference / "mmaction" / "nl-dot-product"
    state = extract_state_dict(load_checkpoint(base / "checkpoint.pth"))
    state.update(load_checkpoint(base / "eval_stable" / "nl_override.pth"))
    for key, value in state.items():
        if "non_local_block" in key and key.endswith("conv.weight"):
            state[key] = value * NL_SCALE
    model = build_model(get_preset("i3d_r50_nl_dot_product", base_channels=8))
    model.load_state_dict(state)
    return model.eval()


def test_natural_clips_follow_shape_channels_and_normalisation():
    x = natural_clips((2, 3, 3, 40, 24, 20))  # 40 frames: more than are decoded
    assert x.shape == (2, 3, 3, 40, 24, 20) and x.dtype == torch.float32
    assert not torch.equal(x[0, 0], x[0, 1])  # each view starts elsewhere
    flow_prep = Preprocessing(mean=(0, 0), std=(1, 1), value_range=(-1, 1), modality="flow")
    flow = natural_clips((1, 2, 4, 16, 16), flow_prep)  # 2 channels, [-1, 1] range
    assert flow.shape == (1, 2, 4, 16, 16) and flow.min() >= -1 and flow.max() <= 1
    assert sample_frames().dtype == torch.uint8


def test_natural_frames_keep_a_model_finite_that_randn_drives_to_nan(reference):
    model = _loud_nonlocal_model(reference)
    shape = (3, 3, 16, 64, 64)  # what export_onnx checks: 3 clips of the exported shape
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert not model(noise).isfinite().all()  # the check input export used to feed
        assert model(natural_clips_for(model, shape)).isfinite().all()


@pytest.mark.slow  # about 2 minutes of ONNX export on a shared 2-core machine
def test_export_verifies_a_model_that_randn_drives_to_nan(reference, tmp_path):
    pytest.importorskip("onnxruntime")
    from i3d.export import export_onnx

    result = export_onnx(_loud_nonlocal_model(reference), tmp_path / "nl.onnx", 16, 64)
    assert result.path.is_file() and result.rel_diff <= 1e-4
