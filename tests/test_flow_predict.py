"""Flow and two-stream weights on plain videos: flow views, summed logits, flow folders."""

from __future__ import annotations

import json

import attrs
import numpy as np
import pytest
import torch
from typer.testing import CliRunner
from videogen import write_video

from i3d import get_preset
from i3d.cli import flow_cmd
from i3d.cli.main import app
from i3d.data import transforms as T
from i3d.data.decode import open_frames_dir, open_video
from i3d.data.pipeline import build_pipeline
from i3d.features import SnippetProtocol, iter_snippets
from i3d.features.pooled import video_features
from i3d.flow import FlowConfig, TVL1Params, rgb_to_gray, scale_flow, tvl1_flow
from i3d.flow.store import FlowStoreError, dequantize, open_npy, quantize
from i3d.flow.views import StreamPipeline
from i3d.inference import Predictor
from i3d.models import build_model
from i3d.weights.format import WeightsError, WeightsInfo, load_model, read_info, save_weights
from i3d.weights.preprocessing import DEEPMIND_K400
from i3d.weights.two_stream import combine_two_stream

runner = CliRunner()
#: one scale, one warp, a few iterations: every step of TV-L1, at a tiny cost
FAST = TVL1Params(nscales=1, warps=1, inner_iterations=4, outer_iterations=1)
FLOW = FlowConfig(tvl1=FAST, batch_size=4)
LABELS = ("a", "b", "c")
FLOW_PREP = attrs.evolve(
    DEEPMIND_K400, mean=(0.0, 0.0), std=(1.0, 1.0), modality="flow",
    resize_short=32, crop_size=32, input_size=32,
)  # fmt: skip


def _fast(**kwargs) -> FlowConfig:
    return FlowConfig(**{**kwargs, "tvl1": FAST})


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 16-frame 48×32 video at 25 fps and a tiny Flow-stream model (a 2-channel ResNet3d)."""
    root = tmp_path_factory.mktemp("flowpredict")
    video = write_video(root / "clip.mp4", 16, width=48, height=32)
    torch.manual_seed(0)
    config = get_preset("i3d_r50", depth=18, base_channels=4, num_classes=3, in_channels=2)
    weights = save_weights(
        root / "flow.safetensors",
        build_model(config).state_dict(),
        WeightsInfo(config, LABELS, FLOW_PREP),
    )
    return root, video, weights


def _expected_flow(video, short: int) -> torch.Tensor:
    """Flow of every consecutive frame pair, computed step by step: (T-1, 2, H, W) in [-1, 1]."""
    with open_video(video) as reader:
        frames = torch.from_numpy(reader.get_frames(range(reader.num_frames)))
    gray = torch.from_numpy(rgb_to_gray(T.resize_short(frames, short).numpy()))
    return scale_flow(tvl1_flow(gray[:-1], gray[1:], FAST))


def test_flow_views_follow_the_rgb_clips_and_crops(small):
    _root, video, _weights = small
    pipeline = build_pipeline(FLOW_PREP, "test", window_len=6, num_crops=10, crop_size=24)
    views = StreamPipeline(pipeline, ("flow",), FLOW)
    pieces = list(views.flow_pieces(video, clips_per_piece=2))
    assert [(p.start, p.stop) for p in pieces] == [(0, 2), (2, 3)]
    got = torch.cat([p.views.reshape(10, -1, *p.views.shape[1:]) for p in pieces], dim=1)
    flow = _expected_flow(video, 32)  # (15, 2, 32, 48)
    windows = pipeline.windows(16)  # 3 windows of 6 frames: 0-5, 5-10, 10-15
    boxes = T.view_boxes(48, 32, 24, 10)
    for k, ((x1, y1, x2, y2), mirrored) in enumerate(boxes):
        for c, window in enumerate(windows):
            ticks = np.minimum(window, 14)  # the last frame reuses the flow into it
            want = flow[ticks][..., y1:y2, x1:x2]
            if mirrored:
                want = want.flip(-1) * torch.tensor([-1.0, 1.0])[:, None, None]
            assert torch.allclose(got[k, c], want.permute(1, 0, 2, 3), atol=1e-5)


def test_flow_weights_predict_and_keep_their_flow_in_a_folder(small, tmp_path, monkeypatch):
    _root, video, weights = small
    computed = Predictor(weights, flow=FLOW, window_len=8).scores(video)
    folder = tmp_path / "flow"
    cached = Predictor(weights, flow=FLOW, flow_dir=folder, window_len=8).scores(video)
    stored = open_npy(folder / "clip.npy")
    assert stored.shape == (15, 32, 48, 2) and stored.dtype == np.float16
    assert json.loads((folder / "flow.json").read_text())["size"] == 32
    np.testing.assert_allclose(cached, computed, atol=2e-3)  # float16 storage
    monkeypatch.setattr("i3d.flow.views.iter_timeline_flow", None)  # reading only from here
    monkeypatch.setattr("i3d.flow.views._Computed", None)
    again = Predictor(weights, flow=FLOW, flow_dir=folder, window_len=8).scores(video)
    np.testing.assert_array_equal(again, cached)
    with pytest.raises(FlowStoreError, match="other settings"):
        Predictor(weights, flow=FLOW, flow_dir=folder, fps=12.5)
    monkeypatch.setattr("i3d.inference.sharded.FlowConfig", _fast)
    args = ["predict", str(video), "--weights", str(weights), "--flow-dir", str(folder)]
    cli = runner.invoke(app, [*args, "--json", "--all-scores"])  # one window of 16 frames
    assert cli.exit_code == 0, cli.output
    whole = Predictor(weights, flow=FLOW, flow_dir=folder).scores(video)
    np.testing.assert_allclose(json.loads(cli.output)["scores"], whole, rtol=1e-5)


def test_mmaction_rawframes_written_by_i3d_flow_serve_predict(small, tmp_path, monkeypatch):
    _root, video, weights = small
    monkeypatch.setattr(flow_cmd, "FlowConfig", _fast)
    out = tmp_path / "frames"
    args = ["flow", str(video), "-o", str(out), "--format", "mmaction", "--size", "32"]
    result = runner.invoke(app, [*args, "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (out / "clip").iterdir())
    assert names == sorted(
        [f"img_{i:05d}.jpg" for i in range(1, 17)]
        + [f"flow_{c}_{i:05d}.jpg" for c in "xy" for i in range(1, 16)]
    )
    flow = _expected_flow(video, 32)
    with open_video(out / "clip") as frames:  # mmaction's img_ frames: the resized RGB
        assert frames.num_frames == 16 and frames.size == (48, 32)
    from PIL import Image

    for tick in (0, 14):
        for c, name in enumerate("xy"):
            with Image.open(out / "clip" / f"flow_{name}_{tick + 1:05d}.jpg") as image:
                levels = np.asarray(image).astype(int)
            want = quantize(flow[tick, c].numpy()).astype(int)
            assert np.abs(levels - want).mean() < 1.0  # JPEG at quality 95
    again = runner.invoke(app, [*args, "--batch-size", "4"])
    assert "1 already there" in again.output
    refused = runner.invoke(app, [*args, "--fps", "0"])
    assert refused.exit_code == 1 and "other settings" in refused.output
    scores = Predictor(weights, flow=FLOW, flow_dir=out, window_len=8).scores(video)
    exact = Predictor(weights, flow=FLOW, window_len=8).scores(video)
    np.testing.assert_allclose(scores, exact, atol=0.05)  # 8-bit levels of 0.157 px


def test_denseflow_quantisation():
    values = np.array([-1.5, -1.0, -0.5, 0.0, 1 / 255, 1.0, 2.0])
    assert quantize(values).tolist() == [0, 0, 64, 128, 128, 255, 255]
    fine = np.linspace(-1, 1, 1001)
    assert np.abs(dequantize(quantize(fine)) - fine).max() <= 1 / 255 + 1e-6


def test_damaged_flow_files_are_refused_before_reading(tmp_path):
    path = tmp_path / "v.npy"
    np.save(path, np.zeros((4, 8, 8, 2), np.float16))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(FlowStoreError, match="truncated"):
        open_npy(path)
    np.save(path, np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(FlowStoreError, match="ticks, H, W, 2"):
        open_npy(path)


@pytest.fixture(scope="module")
def streams(tmp_path_factory):
    """Seeded random RGB and Flow Inception I3D files (193² crops, the smallest they take)."""
    root = tmp_path_factory.mktemp("twostream")
    protocol = {"resize_short": 193, "crop_size": 193, "input_size": 193}
    torch.manual_seed(0)
    files = []
    for preset, prep in (
        ("inception_i3d_rgb", attrs.evolve(DEEPMIND_K400, **protocol)),
        ("inception_i3d_flow", attrs.evolve(FLOW_PREP, **protocol)),
    ):
        config = get_preset(preset, num_classes=3)
        info = WeightsInfo(config, LABELS, prep)
        files.append(
            save_weights(root / f"{preset}.safetensors", build_model(config).state_dict(), info)
        )
    video = write_video(root / "clip.mp4", 10, width=208, height=194)
    two = combine_two_stream(files[0], files[1], root / "two.safetensors")
    return root, files[0], files[1], two, video


def test_two_stream_scores_are_the_softmax_of_summed_logits(streams):
    root, rgb, flow, two, video = streams
    made = root / "cli.safetensors"
    result = runner.invoke(app, ["weights", "combine", str(rgb), str(flow), "-o", str(made)])
    assert result.exit_code == 0, result.output
    assert read_info(made).config == read_info(two).config
    model = load_model(two)
    assert model.config.arch == "two_stream"
    predictor = Predictor(two, flow=FLOW)
    scores = predictor.scores(video)
    rgb_views = predictor.pipeline(video)  # (1, 3, 10, 193, 193)
    field = _expected_flow(video, 193)  # (9, 2, 193, 207): 10 positions, the last reuses 8
    x1, y1, x2, y2 = T.center_box(field.shape[-1], field.shape[-2], 193)
    flow_views = field[np.minimum(np.arange(10), 8)][..., y1:y2, x1:x2].permute(1, 0, 2, 3)
    with torch.no_grad():
        logits = model.rgb(rgb_views) + model.flow(flow_views[None])
    np.testing.assert_allclose(scores, logits.softmax(-1)[0].numpy(), rtol=1e-4, atol=1e-6)


def test_combining_streams_checks_what_they_are(streams, tmp_path):
    _root, rgb, flow, _two, _video = streams
    with pytest.raises(WeightsError, match="not the rgb one"):
        combine_two_stream(flow, rgb, tmp_path / "x.safetensors")
    config = get_preset("inception_i3d_flow", num_classes=4)
    other = save_weights(
        tmp_path / "f4.safetensors",
        build_model(config).state_dict(),
        WeightsInfo(
            config, None, attrs.evolve(FLOW_PREP, resize_short=193, crop_size=193, input_size=193)
        ),
    )
    with pytest.raises(WeightsError, match="3 classes but"):
        combine_two_stream(rgb, other, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_snippet_features_of_a_two_stream_file_are_its_streams_concatenated(streams):
    _root, rgb, flow, two, video = streams
    protocol = SnippetProtocol(window=9, stride=9)
    (whole,) = iter_snippets([video], protocol, weights=two, flow=FLOW)
    (apart,) = iter_snippets([video], protocol, weights=rgb, flow_weights=flow, flow=FLOW)
    assert whole.features.shape == (1, 2048)
    np.testing.assert_array_equal(whole.features, apart.features)


def test_evaluate_reads_an_mmaction_flow_list(small, tmp_path, monkeypatch):
    # mmaction2's flow list: `frame_dir total_frames label`, total_frames = flow fields
    _root, video, weights = small
    monkeypatch.setattr(flow_cmd, "FlowConfig", _fast)
    frames = tmp_path / "rawframes"
    args = ["flow", str(video), "-o", str(frames), "--format", "mmaction", "--size", "32"]
    assert runner.invoke(app, args).exit_code == 0
    (tmp_path / "flow_list.txt").write_text("clip 15 1\n")
    out = tmp_path / "eval"
    listing = ["evaluate", str(tmp_path / "flow_list.txt"), "--weights", str(weights)]
    result = runner.invoke(app, [*listing, "--data-root", str(frames), "-o", str(out)])
    assert result.exit_code == 0, result.output
    (line,) = (out / "predictions.jsonl").read_text().splitlines()
    scores = np.array(json.loads(line)["scores"])
    # the same JPEGs, read as the flow folder of the video they were computed from
    by_video = Predictor(weights, flow=FLOW, flow_dir=frames).scores(video)
    np.testing.assert_allclose(scores, by_video, rtol=1e-6)
    # mmaction's flow configs name them x_00001.jpg (filename_tmpl='{}_{:05d}.jpg')
    for image in (frames / "clip").glob("flow_*.jpg"):
        image.rename(image.with_name(image.name.removeprefix("flow_")))
    np.testing.assert_allclose(Predictor(weights).scores(frames / "clip"), by_video, rtol=1e-6)


def test_rawframes_flow_is_resized_as_mmaction_resizes_flow_images(small, tmp_path, monkeypatch):
    _root, video, _weights = small
    monkeypatch.setattr(flow_cmd, "FlowConfig", _fast)
    frames = tmp_path / "rawframes"
    args = ["flow", str(video), "-o", str(frames), "--format", "mmaction", "--size", "48"]
    assert runner.invoke(app, args).exit_code == 0  # 72×48 images; the weights resize to 32
    pipeline = build_pipeline(FLOW_PREP, "test", window_len=8, num_crops=1, crop_size=32)
    (piece,) = StreamPipeline(pipeline, ("flow",), FLOW).flow_pieces(frames / "clip", None)
    ticks = np.minimum(pipeline.windows(16), 14)
    levels = []
    for axis in "xy":
        with open_frames_dir(frames / "clip", f"flow_{axis}_{{:05d}}.jpg") as reader:
            levels.append(reader.get_frames(np.arange(15))[..., :1])
    resized = T.resize_short(torch.from_numpy(np.concatenate(levels, axis=-1)), 32)
    x1, y1, x2, y2 = T.center_box(48, 32, 32)
    want = dequantize(resized.numpy())[ticks][:, :, y1:y2, x1:x2]  # (clips, T, h, w, 2)
    np.testing.assert_array_equal(piece.views.numpy(), want.transpose(0, 4, 1, 2, 3))


def test_snippet_flow_read_from_a_flow_folder_equals_computing_it(small, tmp_path, monkeypatch):
    _root, video, weights = small
    protocol = SnippetProtocol(window=8, stride=4, crops=1)
    flow_only = {"flow_weights": weights, "flow": FLOW, "stream": "flow"}
    (computed,) = iter_snippets([video], protocol, **flow_only)
    folder = tmp_path / "flow"
    (kept,) = iter_snippets([video], protocol, **flow_only, flow_dir=folder)
    assert open_npy(folder / "clip.npy").shape == (15, 32, 48, 2)
    monkeypatch.setattr("i3d.flow.recipe.pair_flow", None)  # from here on, read only
    (read,) = iter_snippets([video], protocol, **flow_only, flow_dir=folder)
    np.testing.assert_allclose(kept.features, computed.features, atol=1e-6)
    np.testing.assert_array_equal(read.features, kept.features)
    with pytest.raises(FlowStoreError, match="other settings"):
        list(iter_snippets([video], attrs.evolve(protocol, fps=12.5), **flow_only, flow_dir=folder))


def _features(args: list) -> str:
    result = runner.invoke(app, ["features", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


def test_cli_snippet_flow_from_a_flow_dir_equals_computing_it(small, tmp_path, monkeypatch):
    _root, video, weights = small
    monkeypatch.setattr("i3d.cli.features_cmd.FlowConfig", _fast)
    common = [video, "--flow-weights", weights, "--stream", "flow", "--window", "8",
              "--stride", "4", "--batch-size", "4"]  # fmt: skip
    _features([*common, "-o", tmp_path / "computed"])
    folder = tmp_path / "flow"
    _features([*common, "--flow-dir", folder, "-o", tmp_path / "read"])
    assert open_npy(folder / "clip.npy").shape == (15, 32, 48, 2)
    computed, read = (np.load(tmp_path / name / "clip.npy") for name in ("computed", "read"))
    assert read.shape == (2, 32)  # 15 flow fields: windows at 0 and 4
    np.testing.assert_allclose(read, computed, atol=1e-6)
    (record,) = [json.loads(line) for line in (tmp_path / "read" / "manifest.jsonl").open()]
    source = record["settings"]["flow_dir"]
    assert source["path"] == str(folder.resolve()) and source["format"] == "npy"
    assert source == {"path": source["path"], **json.loads((folder / "flow.json").read_text())}
    monkeypatch.setattr("i3d.flow.recipe.pair_flow", None)  # the rerun computes nothing
    again = _features([*common, "--flow-dir", folder, "-o", tmp_path / "read"])
    assert "(1 already there)" in again
    other = runner.invoke(app, ["features", *map(str, common), "--fps", "12.5", "--flow-dir",
                                str(folder), "-o", str(tmp_path / "x")])  # fmt: skip
    assert other.exit_code == 1 and "other settings" in other.output
    rgb = runner.invoke(app, ["features", str(video), "--window", "8", "--flow-dir", str(folder),
                              "-o", str(tmp_path / "y")])  # fmt: skip
    assert rgb.exit_code == 1 and "--flow-dir serves the optical-flow stream" in rgb.output


def _pooled(model, views: torch.Tensor, endpoint: str) -> torch.Tensor:
    """(V, C) space-time means of an endpoint over views (V, C, T, H, W), by hand."""
    with torch.no_grad():
        return model.endpoints(views, [endpoint])[endpoint].flatten(2).mean(2)


def test_pooled_features_of_flow_weights_are_their_flow_views_run_by_hand(
    small, tmp_path, monkeypatch
):
    _root, video, _weights = small
    torch.manual_seed(1)  # a flow file that normalises its input: (flow - mean) / std
    prep = attrs.evolve(FLOW_PREP, mean=(0.1, -0.2), std=(0.5, 2.0))
    config = get_preset("i3d_r50", depth=18, base_channels=4, num_classes=3, in_channels=2)
    weights = save_weights(
        tmp_path / "flow.safetensors", build_model(config).state_dict(),
        WeightsInfo(config, LABELS, prep),
    )  # fmt: skip
    monkeypatch.setattr("i3d.inference.sharded.FlowConfig", _fast)
    args = [video, "--weights", weights, "--endpoint", "layer4"]
    _features([*args, "-o", tmp_path / "a.safetensors"])
    folder = tmp_path / "flowdir"
    _features([*args, "--flow-dir", folder, "-o", tmp_path / "b.safetensors"])
    # DeepMind's val protocol: the whole 16-frame video, the centre 32² of 48×32
    field = _expected_flow(video, 32)[np.minimum(np.arange(16), 14)][..., 8:40]
    x = (field.permute(1, 0, 2, 3) - torch.tensor([0.1, -0.2]).view(2, 1, 1, 1)) / torch.tensor(
        [0.5, 2.0]
    ).view(2, 1, 1, 1)
    want = _pooled(load_model(weights), x[None], "layer4")[0]
    from safetensors import safe_open

    for name, atol in (("a", 1e-6), ("b", 2e-3)):  # b: float16 flow in the folder
        with safe_open(str(tmp_path / f"{name}.safetensors"), framework="pt") as fh:
            got, meta = fh.get_tensor("0"), json.loads(fh.metadata()["i3d.features"])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=atol)
    flow = json.loads(meta["flow"])
    assert flow["impl"] == "torch" and flow["folder"]["path"] == str(folder.resolve())
    assert flow["folder"]["size"] == 32 and open_npy(folder / "clip.npy").shape[0] == 15
    mixed = runner.invoke(app, ["features", *map(str, args), "-o", str(tmp_path / "b.safetensors")])
    assert mixed.exit_code == 1 and "other settings: flow" in mixed.output


def test_pooled_features_of_two_stream_weights_are_rgb_then_flow(streams):
    _root, _rgb, _flow, two, video = streams
    model = load_model(two)
    small = {"resize_short": 32, "crop_size": 32, "num_crops": 3}  # an early endpoint: any size
    pipeline = build_pipeline(model.weights_info.preprocessing, "test", **small)
    got = video_features(model, pipeline, video, "Conv3d_1a_7x7", flow=FLOW)
    rgb = _pooled(model.rgb, pipeline.normalize(pipeline.frames(video)), "Conv3d_1a_7x7")
    field = _expected_flow(video, 32)[np.minimum(np.arange(10), 8)]  # (10, 2, 32, 34)
    crops = [field[..., y1:y2, x1:x2] for (x1, y1, x2, y2), _ in T.view_boxes(34, 32, 32, 3)]
    flow_views = torch.stack(crops).permute(0, 2, 1, 3, 4)  # (3 crops, 2, T, 32, 32)
    flow = _pooled(model.flow, flow_views, "Conv3d_1a_7x7")
    assert got.shape == (128,)  # 64 RGB channels, then 64 flow channels, averaged over views
    np.testing.assert_allclose(got, torch.cat([rgb, flow], 1).mean(0), rtol=1e-5, atol=1e-6)
