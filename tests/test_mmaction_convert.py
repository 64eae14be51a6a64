"""mmaction2 checkpoint conversion: inference of the config, wrappers, and every error path."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from i3d import load_model, read_info
from i3d.cli.main import app
from i3d.models import build_model, get_preset
from i3d.utils import files
from i3d.utils.files import OutputError
from i3d.weights.format import WeightsError, WeightsInfo, save_weights
from i3d.weights.mmaction import convert_mmaction
from i3d.weights.safe_pickle import UnsafePickleError

runner = CliRunner()


def _mmaction_checkpoint(path: Path, preset: str, name_hint: str = "", **wrap) -> dict:
    """Write a random-weight model of ``preset`` (width 4) in mmaction's checkpoint layout."""
    torch.manual_seed(0)
    model = build_model(get_preset(preset, base_channels=4))
    sd = model.state_dict()
    ckpt = {"meta": {"mmaction_version": "1.2.0", **wrap.pop("meta", {})}, "state_dict": sd, **wrap}
    torch.save(ckpt, path)
    return sd


@pytest.mark.parametrize(
    ("preset", "file_name"),
    [
        ("i3d_r50", "i3d_r50.pth"),
        ("i3d_r50_heavy", "heavy.pth"),
        ("i3d_r50_nl_gaussian", "nl.pth"),
        ("i3d_r50_nl_embedded_gaussian", "i3d_imagenet-pretrained-r50-nl-embedded-gaussian.pth"),
        ("i3d_r50_nl_dot_product", "i3d_nl_dot_product_r50_32x2x1_100e.pth"),
    ],
)
def test_config_inferred_from_checkpoint(tmp_path, preset, file_name):
    src = tmp_path / file_name
    sd = _mmaction_checkpoint(src, preset)
    dst = convert_mmaction(src, tmp_path / "out.safetensors")
    info = read_info(dst)
    assert info.config == get_preset(preset, base_channels=4)
    model = load_model(dst)
    for key, value in model.state_dict().items():
        assert torch.equal(value, sd[key]), key
    assert info.labels is not None and info.labels[227] == "playing cricket"
    assert info.provenance.source_name == file_name
    assert len(info.provenance.source_sha256) == 64


def test_mode_from_saved_config_text(tmp_path):
    src = tmp_path / "epoch_100.pth"
    cfg = "model = dict(backbone=dict(non_local_cfg=dict(sub_sample=True, mode='dot_product')))"
    _mmaction_checkpoint(src, "i3d_r50_nl_dot_product", meta={"cfg": cfg})
    info = read_info(convert_mmaction(src, tmp_path / "o.safetensors"))
    assert info.config.non_local_mode == "dot_product"


def test_ambiguous_nonlocal_mode_asks_for_preset(tmp_path):
    src = tmp_path / "epoch_100.pth"
    _mmaction_checkpoint(src, "i3d_r50_nl_dot_product")
    with pytest.raises(WeightsError, match="--preset"):
        convert_mmaction(src, tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_ddp_prefix_bare_dict_and_extra_entries(tmp_path):
    torch.manual_seed(1)
    model = build_model(get_preset("i3d_r50", base_channels=4, num_classes=7))
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    src = tmp_path / "ddp.pth"
    torch.save(sd, src)
    info = read_info(convert_mmaction(src, tmp_path / "a.safetensors"))
    assert info.config.head.num_classes == 7 and info.labels is None
    src2 = tmp_path / "full.pth"
    torch.save(
        {"state_dict": model.state_dict(), "optimizer": {"state": {}, "param_groups": []},
         "message_hub": {"log_scalars": {}}, "meta": {"epoch": 3}},
        src2,
    )  # fmt: skip
    convert_mmaction(src2, tmp_path / "b.safetensors")


def test_meta_with_framework_objects_still_converts(tmp_path, monkeypatch):
    """mmengine ConfigDict / HistoryBuffer and numpy scalars in meta are ignored, not run."""
    mod = types.ModuleType("mmengine.logging")

    class HistoryBuffer:
        def __init__(self):
            self._log = np.arange(4.0)

    class ConfigDict(dict):
        pass

    for cls in (HistoryBuffer, ConfigDict):
        cls.__module__, cls.__qualname__ = "mmengine.logging", cls.__name__
    mod.HistoryBuffer, mod.ConfigDict = HistoryBuffer, ConfigDict
    monkeypatch.setitem(sys.modules, "mmengine", types.ModuleType("mmengine"))
    monkeypatch.setitem(sys.modules, "mmengine.logging", mod)
    src = tmp_path / "r50.pth"
    meta = {"hub": HistoryBuffer(), "cfg_dict": ConfigDict(a=1), "seed": np.int64(3)}
    _mmaction_checkpoint(src, "i3d_r50", meta=meta, message_hub={"buf": HistoryBuffer()})
    monkeypatch.delitem(sys.modules, "mmengine.logging")
    monkeypatch.delitem(sys.modules, "mmengine")
    convert_mmaction(src, tmp_path / "o.safetensors")


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_refused_without_side_effects(tmp_path):
    marker = tmp_path / "PWNED"
    src = tmp_path / "evil.pth"
    model = build_model(get_preset("i3d_r50", base_channels=4))
    torch.save({"state_dict": model.state_dict(), "meta": {"x": _Evil(marker)}}, src)
    dst = tmp_path / "out.safetensors"
    with pytest.raises(UnsafePickleError, match=r"posix\.system|os\.system"):
        convert_mmaction(src, dst)
    assert not marker.exists()
    assert not dst.exists()
    assert list(tmp_path.iterdir()) == [src]  # no temp files left either
    result = runner.invoke(app, ["convert-weights", str(src), "-o", str(dst)])
    assert result.exit_code == 1 and "refusing to load" in result.output
    assert not marker.exists()


def test_truncated_and_empty_files(tmp_path):
    src = tmp_path / "r50.pth"
    _mmaction_checkpoint(src, "i3d_r50")
    data = src.read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        convert_mmaction(tmp_path / "trunc.pth", tmp_path / "o.safetensors")
    with pytest.raises(WeightsError, match="empty"):
        convert_mmaction(tmp_path / "empty.pth", tmp_path / "o.safetensors")
    with pytest.raises(WeightsError, match="does not exist"):
        convert_mmaction(tmp_path / "missing.pth", tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_wrong_architecture_and_key_errors(tmp_path):
    sd = build_model(get_preset("i3d_r50", base_channels=4)).state_dict()
    # forcing a preset with another structure names the offending keys
    src = tmp_path / "r50.pth"
    torch.save({"state_dict": sd}, src)
    with pytest.raises(
        WeightsError, match=r"does not match preset 'i3d_r50_heavy'.*layer2\.1\.conv1"
    ):
        convert_mmaction(src, tmp_path / "o.safetensors", preset="i3d_r50_heavy")
    # a missing key and an extra key
    broken = dict(sd)
    del broken["backbone.layer3.2.conv2.bn.running_var"]
    broken["backbone.layer9.weird"] = torch.zeros(1)
    torch.save({"state_dict": broken}, tmp_path / "broken.pth")
    with pytest.raises(WeightsError, match=r"layer9|running_var"):
        convert_mmaction(tmp_path / "broken.pth", tmp_path / "o.safetensors")
    # a checkpoint of something else entirely
    torch.save({"state_dict": {"encoder.weight": torch.zeros(3, 3)}}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="no mmaction model weights"):
        convert_mmaction(tmp_path / "other.pth", tmp_path / "o.safetensors")
    # a mis-shaped tensor
    bad = dict(sd)
    bad["backbone.layer1.0.conv2.conv.weight"] = torch.zeros(4, 4, 1, 1, 1)
    torch.save({"state_dict": bad}, tmp_path / "shape.pth")
    with pytest.raises(WeightsError, match="shape"):
        convert_mmaction(tmp_path / "shape.pth", tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_unwritable_output_directory(tmp_path, monkeypatch):
    src = tmp_path / "r50.pth"
    _mmaction_checkpoint(src, "i3d_r50")
    with pytest.raises(OutputError, match="does not exist"):
        convert_mmaction(src, tmp_path / "nope" / "o.safetensors")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permissions: simulate the OS refusing
            monkeypatch.setattr(
                files.tempfile,
                "mkstemp",
                lambda **kw: (_ for _ in ()).throw(PermissionError(13, "Permission denied")),
            )
        with pytest.raises(OutputError, match="cannot write"):
            convert_mmaction(src, ro / "o.safetensors")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_existing_output_survives_failed_conversion(tmp_path):
    dst = tmp_path / "model.safetensors"
    dst.write_bytes(b"precious")
    (tmp_path / "trunc.pth").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(WeightsError):
        convert_mmaction(tmp_path / "trunc.pth", dst)
    assert dst.read_bytes() == b"precious"


def test_cli_convert_and_inspect(tmp_path, reference):
    src = reference / "mmaction" / "r50" / "checkpoint.pth"
    dst = tmp_path / "r50.safetensors"
    result = runner.invoke(app, ["convert-weights", str(src), "-o", str(dst)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["inspect", str(dst), "--json"])
    assert result.exit_code == 0, result.output
    import json

    data = json.loads(result.output)
    assert data["parameters"] == 539_128
    assert data["provenance"]["source_format"] == "mmaction2"
    assert data["preprocessing"]["clip_len"] == 32
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"class{i}" for i in range(400)))
    result = runner.invoke(
        app, ["convert-weights", str(src), "-o", str(dst), "--labels", str(labels)]
    )
    assert result.exit_code == 0 and read_info(dst).labels[5] == "class5"
    labels.write_text("a\nb\n")
    result = runner.invoke(
        app, ["convert-weights", str(src), "-o", str(dst), "--labels", str(labels)]
    )
    assert result.exit_code == 1 and "2 labels given but the model has 400 classes" in result.output
    result = runner.invoke(app, ["inspect", str(labels)])
    assert result.exit_code == 1 and "not a readable .safetensors" in result.output


def test_load_model_device_and_dtype(tmp_path):
    src = tmp_path / "r50.pth"
    _mmaction_checkpoint(src, "i3d_r50")
    model = load_model(convert_mmaction(src, tmp_path / "o.safetensors"), dtype=torch.float64)
    assert not model.training
    assert next(model.parameters()).dtype == torch.float64
    assert attrs.has(type(model.weights_info))


def test_output_never_replaces_the_input_or_a_folder(tmp_path):
    src = tmp_path / "ckpt.pth"
    model = build_model(get_preset("i3d_r50", base_channels=4, num_classes=5))
    torch.save({"state_dict": model.state_dict()}, src)
    before = src.read_bytes()
    result = CliRunner().invoke(app, ["convert-weights", str(src), "-o", str(src)])
    assert result.exit_code == 1 and "is the input" in result.output
    assert src.read_bytes() == before
    folder = tmp_path / "out"
    folder.mkdir()
    result = CliRunner().invoke(app, ["convert-weights", str(src), "-o", str(folder)])
    assert result.exit_code == 1 and "is a directory" in result.output
    assert list(folder.iterdir()) == []
    with pytest.raises(OutputError, match="is a file"):
        files.ensure_dir(src / "sub")


def test_autodetect_explains_unsafe_and_unknown_files(tmp_path):
    evil = tmp_path / "evil.pth"
    marker = tmp_path / "PWNED"
    evil.write_bytes(b"cposix\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    unknown = tmp_path / "unknown.pth"
    torch.save({"foo.weight": torch.zeros(2)}, unknown)
    runner = CliRunner()
    result = runner.invoke(app, ["convert-weights", str(evil)])
    assert result.exit_code == 1 and "posix.system" in result.output and not marker.exists()
    result = runner.invoke(app, ["convert-weights", str(unknown)])
    assert result.exit_code == 1 and "first keys: ['foo.weight']" in result.output


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("walk\nrun jump\n\n", ("walk", "run jump")),
        ("0 walk\n1 run jump\n", ("walk", "run jump")),  # mmaction label map
        ("0,walk\n1,run\n", ("walk", "run")),
        ("3 idiots\n5 people\n", ("3 idiots", "5 people")),  # numbers are part of the names
        ("0 walk\n2 run\n", ("0 walk", "2 run")),
    ],
)
def test_label_files_plain_or_indexed(tmp_path, text, expected):
    from i3d.weights.labels import read_labels

    (tmp_path / "labels.txt").write_text(text)
    assert read_labels(tmp_path / "labels.txt") == expected


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory) -> Path:
    """A tiny saved model whose metadata and tensors the hostile-file tests tamper with."""
    from i3d.weights.format import WeightsInfo, save_weights

    torch.manual_seed(0)
    config = get_preset("i3d_r50", base_channels=4, num_classes=3)
    path = tmp_path_factory.mktemp("hostile") / "small.safetensors"
    return save_weights(
        path, build_model(config).state_dict(), WeightsInfo(config, ("a", "b", "c"))
    )


def _tampered(src: Path, dst: Path, meta: dict | None = None, **tensors) -> Path:
    """Copy of ``src`` with metadata entries and tensors replaced; with new tensors, without
    the tensor digest (as a file another tool made), so the checks behind it are reached."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from i3d.weights.format import DIGEST_KEY

    with safe_open(str(src), "pt") as fh:
        metadata = {**fh.metadata(), **(meta or {})}
    if tensors:
        metadata.pop(DIGEST_KEY, None)
    save_file({**load_file(str(src)), **tensors}, str(dst), metadata=metadata)
    return dst


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("i3d.labels", "5", "labels must be a list of class names, got int"),
        ("i3d.labels", '"abc"', "labels must be a list of class names, got str"),
        (
            "i3d.labels",
            '{"a": 1, "b": 2, "c": 3}',
            "labels must be a list of class names, got dict",
        ),
        ("i3d.preprocessing", "[1]", "i3d.preprocessing must be a JSON object, got list"),
        ("i3d.provenance", '"x"', "i3d.provenance must be a JSON object, got str"),
    ],
)
def test_metadata_of_the_wrong_json_type_is_refused(small_weights, tmp_path, key, value, message):
    bad = _tampered(small_weights, tmp_path / "bad.safetensors", {key: value})
    with pytest.raises(WeightsError, match=message):
        load_model(bad)
    result = runner.invoke(app, ["inspect", str(bad)])
    assert result.exit_code == 1 and message in result.output and result.exception is not None
    assert isinstance(result.exception, SystemExit)


def test_hostile_config_is_refused_without_allocating(small_weights, tmp_path):
    import json

    from safetensors import safe_open

    with safe_open(str(small_weights), "pt") as fh:
        config = json.loads(fh.metadata()["i3d.config"])
    overflow = _tampered(
        small_weights,
        tmp_path / "overflow.safetensors",
        {"i3d.config": json.dumps({**config, "base_channels": 10**9})},
    )
    result = runner.invoke(app, ["inspect", str(overflow)])
    assert result.exit_code == 1 and "cannot be built" in result.output
    with pytest.raises(WeightsError, match="cannot be built"):
        load_model(overflow)
    # ~10^12 parameters: inspect counts them on the meta device instead of allocating 4 TB
    huge = _tampered(
        small_weights,
        tmp_path / "huge.safetensors",
        {"i3d.config": json.dumps({**config, "base_channels": 100_000})},
    )
    result = runner.invoke(app, ["inspect", str(huge), "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["parameters"] > 10**12
    with pytest.raises(WeightsError, match="shape mismatches"):
        load_model(huge)


def test_weight_values_are_checked_on_load(small_weights, tmp_path):
    from safetensors.torch import load_file

    tensors = load_file(str(small_weights))
    key = "backbone.conv1.bn.bias"
    nan = _tampered(
        small_weights, tmp_path / "nan.safetensors", **{key: torch.full_like(tensors[key], np.nan)}
    )
    with pytest.raises(WeightsError, match=rf"NaN or infinite values in 1 tensors: {key}"):
        load_model(nan)
    ints = _tampered(
        small_weights, tmp_path / "int.safetensors", **{key: tensors[key].to(torch.int32)}
    )
    with pytest.raises(WeightsError, match=rf"dtype mismatches \(1\): {key}: file torch.int32"):
        load_model(ints)
    half = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    model = load_model(_tampered(small_weights, tmp_path / "half.safetensors", **half))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    x = torch.randn(1, 3, 8, 32, 32)
    with torch.no_grad():
        expected = load_model(small_weights)(x)
        torch.testing.assert_close(model(x), expected, atol=1e-2, rtol=1e-2)


def test_save_weights_names_what_is_not_a_state_dict(small_weights, tmp_path):
    from i3d.weights.format import save_weights

    model = load_model(small_weights)
    state = {**model.state_dict(), "backbone.conv1.conv.weight": [1, 2]}
    with pytest.raises(
        WeightsError, match=r"'backbone\.conv1\.conv\.weight' is a list, not a tensor"
    ):
        save_weights(tmp_path / "x.safetensors", state, model.weights_info)
    with pytest.raises(WeightsError, match=r"expected a state dict \(model.state_dict\(\)\)"):
        save_weights(tmp_path / "x.safetensors", model, model.weights_info)
    assert not (tmp_path / "x.safetensors").exists()


def test_checkpoint_missing_a_block_conv_or_with_odd_keys(tmp_path):
    src = tmp_path / "ckpt.pth"
    sd = _mmaction_checkpoint(src, "i3d_r50")
    damaged = {**sd, "backbone.layer1.0.conv1.conv.weight": [1, 2, 3], 7: torch.zeros(1)}
    torch.save({"state_dict": damaged}, src)
    result = runner.invoke(app, ["convert-weights", str(src)])
    assert result.exit_code == 1
    assert "incomplete mmaction ResNet3d checkpoint: no 5-D 'backbone.layer1.0.conv1" in (
        result.output
    )


def test_label_file_with_a_byte_order_mark(tmp_path):
    from i3d.weights.labels import read_labels

    (tmp_path / "labels.txt").write_text("0 walk\n1 run\n", encoding="utf-8-sig")
    assert read_labels(tmp_path / "labels.txt") == ("walk", "run")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize(
    ("device", "message"),
    [("cuda", "device cuda is not available"), ("garbage", "invalid device 'garbage'")],
)
def test_load_model_names_a_device_it_cannot_use(tmp_path, device, message):
    path = tmp_path / "w.safetensors"
    config = get_preset("i3d_r50", base_channels=4, num_classes=3)
    save_weights(path, build_model(config).state_dict(), WeightsInfo(config))
    with pytest.raises(WeightsError, match=message):
        load_model(path, device=device)
