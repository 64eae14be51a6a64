"""ResNet3d I3D vs the real mmaction2 outputs (float64, fixtures in shared/reference/mmaction)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from i3d import load_model
from i3d.models import build_model, get_preset
from i3d.weights.mmaction import convert_mmaction
from i3d.weights.safe_pickle import load_checkpoint

TOL = 1e-9  # relative to max|expected|
CASES = {
    "r50": ("i3d_r50", "r50", None),
    "nl-dot-product": ("i3d_r50_nl_dot_product", "nl-dot-product", None),
    "nl-dot-product-eval": ("i3d_r50_nl_dot_product", "nl-dot-product", "eval_stable"),
}


def _rel(out: torch.Tensor, expected: np.ndarray) -> float:
    return float(np.abs(out.detach().numpy() - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module", params=list(CASES))
def converted(request, reference, tmp_path_factory):
    preset, name, overlay = CASES[request.param]
    base = reference / "mmaction" / name
    src = base / "checkpoint.pth"
    if overlay:
        ckpt = load_checkpoint(src)
        ckpt["state_dict"].update(load_checkpoint(base / overlay / "nl_override.pth"))
        src = tmp_path_factory.mktemp("ovl") / "checkpoint.pth"
        torch.save(ckpt, src)
    dst = tmp_path_factory.mktemp("conv") / "model.safetensors"
    convert_mmaction(src, dst, preset=preset)
    model = load_model(dst).double()
    x = torch.from_numpy(np.load(base / "input.npy")).double()
    return model, x, base / overlay if overlay else base


def test_eval_logits_and_features(converted):
    model, x, expected_dir = converted
    if not (expected_dir / "expected_logits.npy").exists():
        pytest.skip("eval outputs overflow for plain nl-dot-product; eval_stable covers it")
    with torch.no_grad():
        assert _rel(model(x), np.load(expected_dir / "expected_logits.npy")) <= TOL
        assert _rel(model.features(x), np.load(expected_dir / "expected_features.npy")) <= TOL


def test_train_mode_logits(converted):
    model, x, expected_dir = converted
    model.train()
    model.cls_head.dropout.eval()  # the fixture turns dropout off, BN uses batch statistics
    with torch.no_grad():
        out = model(x)
    model.eval()
    assert _rel(out, np.load(expected_dir / "expected_train_logits.npy")) <= TOL


def test_views_input_gives_per_view_logits(converted):
    model, x, _ = converted
    with torch.no_grad():
        per_clip = model(x)
        views = model(x[None])  # one sample with two views
        scores = model.predict(x[None])
    assert views.shape == (1, 2, 400)
    torch.testing.assert_close(views[0], per_clip)
    torch.testing.assert_close(scores[0], per_clip.softmax(-1).mean(0))


PRESETS = {
    "r50": "i3d_r50",
    "dense": "i3d_r50_dense",
    "heavy": "i3d_r50_heavy",
    "nl-dot-product": "i3d_r50_nl_dot_product",
    "nl-embedded-gaussian": "i3d_r50_nl_embedded_gaussian",
    "nl-gaussian": "i3d_r50_nl_gaussian",
}


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("size", ["full", "small"])
def test_preset_state_dict_matches_manifest(reference, name, size):
    manifest = json.loads(
        (reference / "mmaction" / "manifests" / f"{name}.{size}.json").read_text()
    )
    overrides = {} if size == "full" else {"base_channels": 8}
    with torch.device("meta"):
        model = build_model(get_preset(PRESETS[name], **overrides))
    got = [
        [k, list(v.shape), str(v.dtype).removeprefix("torch.")]
        for k, v in model.state_dict().items()
    ]
    assert got == manifest["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]
