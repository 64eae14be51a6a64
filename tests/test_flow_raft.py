"""The optional RAFT flow (torchvision, local weights): refusals without it, and, where
torchvision imports, equality with torchvision's model run by hand, through i3d flow and predict."""

from __future__ import annotations

import json
import pickle
import sys

import attrs
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner
from videogen import pattern_frame, write_video

from i3d import get_preset
from i3d.cli.main import app
from i3d.data.decode import open_video
from i3d.flow import FlowConfig, TVL1Params, check_flow, deepmind_flow, scale_flow, video_flow
from i3d.flow import raft as raft_module
from i3d.flow.raft import RaftMissingError, raft_recorded, read_raft_checkpoint
from i3d.inference import Predictor
from i3d.models import build_model
from i3d.weights.format import WeightsError, WeightsInfo, save_weights
from i3d.weights.preprocessing import DEEPMIND_K400

runner = CliRunner()
FAST = TVL1Params(nscales=1, warps=1, inner_iterations=4, outer_iterations=1)
#: keys of a RAFT checkpoint, enough to be told apart from other files (no torchvision needed)
LOOKS_LIKE_RAFT = {"feature_encoder.convnormrelu.0.weight": torch.zeros(4)}


def _one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for needle in needles:
        assert needle in lines[0], result.output


@pytest.fixture
def video(tmp_path):
    return write_video(tmp_path / "clip.mp4", 4, width=64, height=64)


@pytest.fixture
def fake_raft(tmp_path):
    """A file with a RAFT checkpoint's key names but not its tensors."""
    path = tmp_path / "raft_fake.pth"
    torch.save(LOOKS_LIKE_RAFT, path)
    return path


def _without_torchvision(monkeypatch) -> None:
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import raises ModuleNotFoundError


# -- refusals (run everywhere; CI has no torchvision) ------------------------------------------


def test_raft_settings_are_checked():
    with pytest.raises(ValueError, match="needs its weights"):
        FlowConfig(impl="raft")
    with pytest.raises(ValueError, match="serve the raft flow"):
        FlowConfig(impl="torch", raft_weights="raft.pth")


def test_missing_torchvision_is_one_line(video, fake_raft, tmp_path, monkeypatch):
    _without_torchvision(monkeypatch)
    config = FlowConfig(impl="raft", raft_weights=fake_raft)
    with pytest.raises(RaftMissingError, match="pip install torchvision"):
        check_flow(config)
    result = runner.invoke(
        app, ["flow", str(video), "-o", str(tmp_path / "o"), "--impl", "raft",
              "--raft-weights", str(fake_raft)],
    )  # fmt: skip
    _one_line_error(result, "needs torchvision", "pip install torchvision")
    assert not (tmp_path / "o").exists()


def test_a_torchvision_that_fails_to_import_is_one_line(fake_raft, tmp_path, monkeypatch):
    broken = tmp_path / "site" / "torchvision"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text(
        'raise RuntimeError("operator torchvision::nms does not exist\\nmore detail")\n'
    )
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(RaftMissingError, match=r"fails to import: operator torchvision::nms") as e:
        check_flow(FlowConfig(impl="raft", raft_weights=fake_raft))
    assert "\n" not in str(e.value)


def test_missing_or_wrong_weights_are_one_line(video, tmp_path, monkeypatch):
    out = ["-o", str(tmp_path / "o"), "--impl", "raft"]
    result = runner.invoke(app, ["flow", str(video), *out])
    _one_line_error(result, "needs its weights", "--raft-weights")
    missing = runner.invoke(
        app, ["flow", str(video), *out, "--raft-weights", str(tmp_path / "nope.pth")]
    )
    _one_line_error(missing, "nope.pth do not exist")
    other = tmp_path / "other.safetensors"
    save_file({"conv.weight": torch.zeros(3)}, str(other))
    wrong = runner.invoke(app, ["flow", str(video), *out, "--raft-weights", str(other)])
    _one_line_error(wrong, "not a torchvision RAFT checkpoint")
    text = tmp_path / "text.pth"
    text.write_text("not a checkpoint")
    unreadable = runner.invoke(app, ["flow", str(video), *out, "--raft-weights", str(text)])
    _one_line_error(unreadable, "text.pth")
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], listed)
    not_a_dict = runner.invoke(app, ["flow", str(video), *out, "--raft-weights", str(listed)])
    _one_line_error(not_a_dict, "not a RAFT state dict")
    tvl1 = runner.invoke(app, ["flow", str(video), "-o", str(tmp_path / "t"),
                               "--raft-weights", str(other)])  # fmt: skip
    _one_line_error(tvl1, "serve the raft flow")
    monkeypatch.setattr(raft_module, "MAX_WEIGHTS_BYTES", 16)
    big = runner.invoke(app, ["flow", str(video), *out, "--raft-weights", str(other)])
    _one_line_error(big, "refusing to read them")
    assert not (tmp_path / "o").exists()


def test_a_malicious_pickle_runs_nothing(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "raft_evil.pth"
    path.write_bytes(pickle.dumps({"feature_encoder.x": Exploit()}))
    with pytest.raises(WeightsError, match="refusing to load"):
        read_raft_checkpoint(str(path))


def test_predict_and_features_refuse_raft_in_one_line(tmp_path, video, fake_raft, monkeypatch):
    _without_torchvision(monkeypatch)
    weights = _flow_weights(tmp_path)
    raft = ["--flow-impl", "raft", "--raft-weights", str(fake_raft)]
    predict = runner.invoke(app, ["predict", str(video), "--weights", str(weights), *raft])
    _one_line_error(predict, "needs torchvision")
    pooled = runner.invoke(app, ["features", str(video), "--weights", str(weights),
                                 "--endpoint", "layer4", "-o", str(tmp_path / "f.safetensors"),
                                 *raft])  # fmt: skip
    _one_line_error(pooled, "needs torchvision")
    snippets = runner.invoke(app, ["features", str(video), "--flow-weights", str(weights),
                                   "--stream", "flow", "--window", "2", "-o", str(tmp_path / "s"),
                                   *raft])  # fmt: skip
    _one_line_error(snippets, "needs torchvision")
    no_weights = runner.invoke(app, ["predict", str(video), "--weights", str(weights),
                                     "--flow-impl", "raft"])  # fmt: skip
    _one_line_error(no_weights, "needs its weights")


def _flow_weights(root):
    """A tiny Flow-stream model (2-channel ResNet3d) reading 64² frames, 64² crops."""
    prep = attrs.evolve(
        DEEPMIND_K400, mean=(0.0, 0.0), std=(1.0, 1.0), modality="flow",
        resize_short=64, crop_size=64, input_size=64,
    )  # fmt: skip
    torch.manual_seed(0)
    config = get_preset("i3d_r50", depth=18, base_channels=4, num_classes=3, in_channels=2)
    return save_weights(
        root / "flow.safetensors",
        build_model(config).state_dict(),
        WeightsInfo(config, ("a", "b", "c"), prep),
    )


# -- with torchvision: the same flow as its model run by hand ---------------------------------


@pytest.fixture(scope="module")
def small_raft(tmp_path_factory):
    """torchvision's raft_small with random weights, saved as torchvision saves checkpoints."""
    optical_flow = pytest.importorskip("torchvision.models.optical_flow")
    torch.manual_seed(0)
    model = optical_flow.raft_small(weights=None).eval()
    path = tmp_path_factory.mktemp("raft") / "raft_small_random.pth"
    torch.save(model.state_dict(), path)
    return path, model, optical_flow.Raft_Small_Weights.DEFAULT.transforms()


def _by_hand(model, transforms, frames: np.ndarray, pad: tuple[int, int, int, int] = (0,) * 4):
    """Raw RAFT flow of consecutive frames as torchvision's docs run it (padded by ``pad``)."""
    rgb = torch.from_numpy(frames).permute(0, 3, 1, 2)
    first, second = transforms(rgb[:-1], rgb[1:])
    if any(pad):
        first, second = (F.pad(x, pad, mode="replicate") for x in (first, second))
    with torch.no_grad():
        flow = model(first, second)[-1]
    left, _, top, _ = pad
    return flow[:, :, top : top + frames.shape[1], left : left + frames.shape[2]]


def test_raft_flow_is_torchvisions_model_then_the_recipe(small_raft):
    path, model, transforms = small_raft
    frames = np.stack([pattern_frame(i * 3, 128, 128) for i in range(3)])
    config = FlowConfig(impl="raft", raft_weights=path, batch_size=2)
    got = deepmind_flow(frames, config)
    raw = _by_hand(model, transforms, frames)
    assert got.shape == (2, 2, 128, 128) and raw.abs().max() > 0
    torch.testing.assert_close(got, scale_flow(raw), atol=1e-5, rtol=0)
    # 124×90 runs padded (edges repeated) to 128×128, the smallest torchvision takes
    odd = np.ascontiguousarray(frames[:2, 5:95, 2:126])
    got = deepmind_flow(odd, config, layout="cthw")
    raw = _by_hand(model, transforms, odd, pad=(2, 2, 19, 19))
    assert got.shape == (2, 1, 90, 124)
    torch.testing.assert_close(got, scale_flow(raw).permute(1, 0, 2, 3), atol=1e-5, rtol=0)


def test_raft_is_told_apart_and_recorded(small_raft, tmp_path):
    path, model, _ = small_raft
    optical_flow = pytest.importorskip("torchvision.models.optical_flow")
    large = tmp_path / "raft_large.safetensors"
    save_file(optical_flow.raft_large(weights=None).state_dict(), str(large))
    assert read_raft_checkpoint(str(large)).arch == "raft_large"
    recorded = raft_recorded(str(path))
    assert recorded["model"] == "raft_small" and recorded["updates"] == 12
    assert len(recorded["weights_sha256"]) == 64
    config = FlowConfig(impl="raft", raft_weights=path)
    assert config.recorded() == {"impl": "raft", "tvl1": None, "bound": 20.0, "raft": recorded}
    shaped = {**model.state_dict()}
    shaped["update_block.flow_head.conv2.weight"] = torch.zeros(1)
    wrong = tmp_path / "raft_wrong.pth"
    torch.save(shaped, wrong)
    with pytest.raises(WeightsError, match="1 tensors of other shape"):
        check_flow(FlowConfig(impl="raft", raft_weights=wrong))


def test_i3d_flow_and_video_flow_with_raft(small_raft, video, tmp_path):
    path, model, transforms = small_raft
    config = FlowConfig(impl="raft", raft_weights=path, batch_size=2)
    flow = video_flow(video, config, fps=None)
    tvl1 = video_flow(video, FlowConfig(tvl1=FAST), fps=None)
    assert flow.shape == tvl1.shape == (3, 64, 64, 2)
    with open_video(video) as reader:
        frames = reader.get_frames(range(reader.num_frames))
    raw = _by_hand(model, transforms, frames, pad=(32, 32, 32, 32))  # 64² runs at 128²
    want = scale_flow(raw).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(flow, want, atol=1e-5)
    out = tmp_path / "flow"
    args = ["flow", str(video), "-o", str(out), "--fps", "0", "--batch-size", "2", "--impl",
            "raft", "--raft-weights", str(path), "--crop", "48"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.load(out / "clip.npy"), flow[:, 8:56, 8:56])
    settings = json.loads((out / "flow.json").read_text())
    assert settings["impl"] == "raft" and settings["tvl1"] is None
    assert settings["raft"] == raft_recorded(str(path))
    other = tmp_path / "raft_other.pth"
    torch.save({k: v + 1 for k, v in model.state_dict().items()}, other)
    again = runner.invoke(app, [*args[:-4], "--raft-weights", str(other), "--crop", "48"])
    assert again.exit_code == 1 and "other settings" in again.output


def test_flow_weights_predict_and_record_raft_flow(small_raft, tmp_path):
    path, _, _ = small_raft
    video = write_video(tmp_path / "clip8.mp4", 8, width=64, height=64)  # one 8-frame clip
    weights = _flow_weights(tmp_path)
    folder = tmp_path / "flow"
    config = FlowConfig(impl="raft", raft_weights=path)
    scores = Predictor(weights, flow=config, flow_dir=folder).scores(video)  # computes, keeps
    assert json.loads((folder / "flow.json").read_text())["raft"] == raft_recorded(str(path))
    raft = ["--flow-impl", "raft", "--raft-weights", str(path), "--flow-dir", str(folder)]
    result = runner.invoke(app, ["predict", str(video), "--weights", str(weights), "--json",
                                 "--all-scores", *raft])  # fmt: skip
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(json.loads(result.output)["scores"], scores, rtol=1e-6)
    out = tmp_path / "features.safetensors"
    features = runner.invoke(app, ["features", str(video), "--weights", str(weights),
                                   "--endpoint", "layer4", "-o", str(out), *raft])  # fmt: skip
    assert features.exit_code == 0, features.output
    with safe_open(str(out), "pt") as f:
        assert raft_recorded(str(path))["weights_sha256"] in json.dumps(f.metadata())
