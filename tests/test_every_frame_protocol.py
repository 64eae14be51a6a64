"""Every-frame weights (DeepMind's protocol): bounded windows streamed one at a time, --clips /
--clip-len / --crops 3 from the CLI, and exported models with a static clip length on videos of
any length."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import attrs
import numpy as np
import pytest
import torch
from typer.testing import CliRunner
from videogen import write_video

from i3d import get_preset, load_model
from i3d.cli.main import app
from i3d.data import pipeline as pipeline_module
from i3d.data.decode import open_video
from i3d.data.pipeline import PIPELINE_OPTIONS, build_pipeline, join_pieces
from i3d.data.sampling import FrameWindows, SampleFrames
from i3d.inference import InputError, Predictor
from i3d.inference.predictor import fit_exported_clip_len
from i3d.models import build_model
from i3d.models.recognizer import average_views
from i3d.weights.format import WeightsInfo, save_weights
from i3d.weights.preprocessing import DEEPMIND_K400, MMACTION_K400

LABELS = ("walk", "run", "jump", "swim", "sit")
SMALL = {"resize_short": 40, "crop_size": 32, "input_size": 32}  # DeepMind's 256 / 224, scaled
runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny weights with DeepMind's every-frame protocol (and mmaction's), and two videos."""
    root = tmp_path_factory.mktemp("every_frame")
    torch.manual_seed(0)
    config = get_preset("i3d_r50", depth=18, base_channels=4, inflate=(1, 0, 0, 0), num_classes=5)
    state = build_model(config).state_dict()
    deepmind = save_weights(
        root / "deepmind.safetensors",
        state,
        WeightsInfo(config, LABELS, attrs.evolve(DEEPMIND_K400, **SMALL)),
    )
    mmaction_prep = attrs.evolve(MMACTION_K400, clip_len=8, resize_short=40, crop_size=40)
    mmaction = save_weights(
        root / "mmaction.safetensors", state, WeightsInfo(config, LABELS, mmaction_prep)
    )
    short = write_video(root / "short.mp4", 12, width=48, height=40)
    long = write_video(root / "long.mp4", 60, width=48, height=40)
    return deepmind, mmaction, short, long


def _reader(frames: int, fps: float = 25.0) -> SimpleNamespace:
    """What the pipeline's frame plan reads of a video: its length and frame rate."""
    return SimpleNamespace(num_frames=frames, fps=fps)


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_window_plan():
    windows = FrameWindows()  # 250 frames (10 s at 25 fps), at most 10 windows
    assert windows.plan(79)[0] == 79 and windows(79).tolist() == [list(range(79))]
    assert windows(250).shape == (1, 250)  # a Kinetics clip: one clip of all its frames
    length, starts = windows.plan(251)
    assert length == 126 and starts.tolist() == [0, 125]
    length, starts = windows.plan(15000)  # 10 minutes at 25 fps
    assert length == 250 and starts.tolist() == [i * 14750 // 9 for i in range(10)]
    assert windows(15000)[-1, -1] == 14999
    length, starts = windows.plan(2000)  # <= 10 x 250: 8 windows tile the video exactly
    assert length == 250 and starts.tolist() == list(range(0, 2000, 250))
    length, starts = FrameWindows(max_windows=1).plan(1000)
    assert length == 250 and starts.tolist() == [375]  # the centre window
    for total in (1, 7, 249, 251, 999, 2499, 2501, 10**6):
        inds = windows(total)
        assert inds.size <= 2500 and inds.min() == 0 and inds.max() == total - 1
        assert np.unique(inds).size == min(total, inds.size)  # all frames if they fit, once
    with pytest.raises(ValueError, match="window_len must be >= 1"):
        FrameWindows(window_len=0)


def test_every_frame_pipeline_reads_a_bounded_number_of_frames():
    pipeline = build_pipeline(DEEPMIND_K400, "test")
    assert pipeline.sampler is None and pipeline.windows == FrameWindows(250, 10)
    inds = pipeline.clip_indices(_reader(18000, fps=30.0), None)  # 10 min at 30 fps
    assert inds.shape == (10, 250) and inds.max() < 18000
    assert np.all(np.diff(inds, axis=1) >= 1)  # 25 fps from 30: frames skipped, never repeated
    assert pipeline.clip_indices(_reader(79), None).tolist() == [list(range(79))]
    five = build_pipeline(DEEPMIND_K400, "test", num_clips=5)  # --clips 5
    assert five.windows.max_windows == 5 and five.clip_indices(_reader(15000), None).shape == (
        5,
        250,
    )
    assert build_pipeline(DEEPMIND_K400, "val").windows.max_windows == 10  # features default
    every = build_pipeline(DEEPMIND_K400, "test", num_clips=60).clip_indices(_reader(15000), None)
    assert every.shape == (60, 250) and np.unique(every).size == 15000  # --clips 60: all frames
    with pytest.raises(ValueError, match="give one of them"):
        build_pipeline(DEEPMIND_K400, "test", num_clips=5, max_windows=4)
    with pytest.raises(ValueError, match="invalid every-frame windows"):
        build_pipeline(DEEPMIND_K400, "test", window_len=0)


def test_windows_are_views_of_consecutive_frames(setup, monkeypatch):
    deepmind, _mmaction, _short, long = setup
    pipeline = build_pipeline(attrs.evolve(DEEPMIND_K400, **SMALL), "test", window_len=20)
    views = pipeline.frames(long)
    assert views.shape == (3, 3, 20, 32, 32)
    with open_video(long) as reader:
        expected = torch.from_numpy(reader.get_frames(range(60)))[:, 4:36, 8:40]
    for view, start in zip(views, (0, 20, 40), strict=True):
        assert torch.equal(view.permute(1, 2, 3, 0), expected[start : start + 20])
    monkeypatch.setitem(PIPELINE_OPTIONS, "window_len", 20)
    predictor = Predictor(deepmind)
    model = load_model(deepmind)
    want = average_views(model(pipeline(long)[None]), "prob")[0].detach().numpy()
    assert np.allclose(predictor.scores(long), want, atol=1e-6)


def test_windows_stream_one_at_a_time(setup, monkeypatch):
    """Pieces hold one window each and come out as the decoder passes their last frame."""
    _deepmind, _mmaction, _short, long = setup
    prep = attrs.evolve(DEEPMIND_K400, **SMALL)
    pipeline = build_pipeline(prep, "test", window_len=8, max_windows=100)  # 60 frames: 8 x 8
    allocated = []
    real_empty = pipeline_module.empty_frames
    monkeypatch.setattr(
        pipeline_module, "empty_frames", lambda shape: allocated.append(shape) or real_empty(shape)
    )
    decoded = []
    with open_video(long) as reader:
        windows = pipeline.clip_indices(reader, None)
        real_iter = reader.iter_frames

        def counting(indices):
            for index, frame in real_iter(indices):
                decoded.append(index)
                yield index, frame

        reader.iter_frames = counting
        pieces = []
        for number, piece in enumerate(pipeline.pieces(reader)):
            assert (piece.start, piece.stop, piece.clips) == (number, number + 1, 8)
            assert piece.views.shape == (1, 3, 8, 32, 32) and piece.last == (number == 7)
            assert max(decoded) < windows[number, -1] + 16  # at most one decode chunk ahead
            # handed out, this one, and those the same 16-frame decode chunk reached
            assert len(allocated) - number <= 1 + 16 // 8
            pieces.append(piece.views)
    assert allocated == [(1, 8, 32, 32, 3)] * 8 and sorted(decoded) == list(range(60))
    assert torch.equal(join_pieces(pieces, 1), pipeline.frames(long))
    three = build_pipeline(prep, "test", window_len=8, num_crops=3)  # crop-major, as frames
    joined = join_pieces([p.views for p in three.pieces(long, clips_per_piece=3)], 3)
    assert torch.equal(joined, three.frames(long))


def test_streamed_scores_equal_the_scores_of_all_views(setup, tmp_path, monkeypatch):
    deepmind, mmaction, short, long = setup
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"garbage")
    monkeypatch.setitem(PIPELINE_OPTIONS, "window_len", 8)  # 60 frames: 8 windows
    for weights, clips, batch, per_piece in ((deepmind, None, 1, 1), (mmaction, 4, 2, 2)):
        predictor = Predictor(weights, clips, batch_size=batch)  # mmaction: 4 clips x 3 crops
        assert predictor.clips_per_piece == per_piece  # 2 clips x 3 crops: 3 whole batches
        whole = {v: predictor.scores_of_views(predictor.pipeline.frames(v)) for v in (long, short)}
        np.testing.assert_allclose(predictor.scores(long), whole[long], atol=1e-6)
        for workers in (0, 2):  # workers: videos interleave, results keep the input order
            got = list(predictor.iter_scores([long, bad, short], workers))
            assert isinstance(got[1], str) and "bad.mp4" in got[1]
            np.testing.assert_allclose(got[0], whole[long], atol=1e-6)
            np.testing.assert_allclose(got[2], whole[short], atol=1e-6)
    assert predictor.runner.channels_last  # the CPU default; the scores above match anyway
    plain = Predictor(deepmind, backend_options={"channels_last": False})
    assert not plain.runner.channels_last
    np.testing.assert_allclose(plain.scores(long), Predictor(deepmind).scores(long), rtol=1e-5)
    seen = []
    predictor = Predictor(deepmind)
    list(predictor.iter_scores([long], 0, on_views=lambda done, total: seen.append((done, total))))
    assert seen == [(i, 8) for i in range(9)]  # the whole video's progress, window by window


def test_cli_clips_caps_the_windows(setup, monkeypatch):
    deepmind, _mmaction, _short, long = setup
    monkeypatch.setitem(PIPELINE_OPTIONS, "window_len", 8)  # 60 frames: 8 windows, capped at 5
    args = ["predict", str(long), "--weights", str(deepmind), "--json", "--top-k", "5"]
    five = _json(runner.invoke(app, [*args, "--clips", "5"]))["top"]
    predictor = Predictor(deepmind, clips=5)
    views = predictor.pipeline.frames(long)
    assert views.shape[:3] == (5, 3, 8)
    want = predictor.scores_of_views(views)
    for top in five:
        assert top["score"] == pytest.approx(float(want[LABELS.index(top["label"])]), abs=1e-6)
    assert _json(runner.invoke(app, args))["top"] != five  # the default: 8 windows


def test_cli_clip_len_samples_clips_as_mmaction(setup):
    deepmind, mmaction, _short, long = setup
    predictor = Predictor(deepmind, clip_len=8)  # every-frame weights: 10 clips by default
    assert predictor.pipeline.sampler == SampleFrames(8, 1, 10, test_mode=True)
    with open_video(long) as reader:
        inds = Predictor(deepmind, clips=3, clip_len=8).pipeline.clip_indices(reader, None)
    assert inds.tolist() == SampleFrames(8, 1, 3, test_mode=True)(60).reshape(3, 8).tolist()
    assert Predictor(mmaction, clip_len=4).pipeline.sampler == SampleFrames(
        4, 2, 10, test_mode=True
    )  # mmaction weights: only the clip length changes
    for command in ("predict", "evaluate", "features"):
        assert "--clip-len" in runner.invoke(app, [command, "--help"]).output
    args = ["predict", str(long), "--weights", str(deepmind), "--json", "--clip-len", "8"]
    got = _json(runner.invoke(app, [*args, "--clips", "3"]))
    best = Predictor(deepmind, clips=3, clip_len=8).predict(long).top(1)[0]
    assert got["top"][0]["label"] == best[1]
    assert got["top"][0]["score"] == pytest.approx(best[2], abs=1e-6)


def test_features_clip_len_and_windows(setup, tmp_path, monkeypatch):
    deepmind, _mmaction, _short, long = setup
    monkeypatch.setitem(PIPELINE_OPTIONS, "window_len", 20)
    base = ["features", str(long), "--weights", str(deepmind), "--endpoint", "layer1"]
    for extra, views in (
        ([], 3),
        (["--clip-len", "8"], 1),
        (["--clip-len", "8", "--clips", "2"], 2),
    ):
        out = tmp_path / f"maps{len(extra)}"
        result = runner.invoke(app, [*base, "--pool", "none", *extra, "-o", str(out)])
        assert result.exit_code == 0, result.output
        index = json.loads((out / "index.json").read_text())
        arr = np.load(out / next(iter(index["files"])))
        assert arr.shape[0] == views, extra


def test_cli_three_crops_on_deepmind_preprocessing(setup):
    deepmind, _mmaction, _short, long = setup
    help_text = runner.invoke(app, ["predict", "--help"], env={"COLUMNS": "300"}).output
    assert "resized to the crop size" in help_text
    args = ["predict", str(long), "--weights", str(deepmind), "--json", "--crops", "3"]
    got = _json(runner.invoke(app, args))
    predictor = Predictor(deepmind, crops=3)
    assert predictor.pipeline.preprocessing.resize_short == 32 == predictor.pipeline.crop_size
    views = predictor.pipeline.frames(long)
    assert views.shape == (3, 3, 60, 32, 32)  # 48x40 -> 38x32, three 32x32 crops along the width
    assert got["top"][0]["score"] == pytest.approx(predictor.predict(long).top(1)[0][2], abs=1e-6)
    with pytest.raises(ValueError, match="set both to one value, or override neither"):
        build_pipeline(DEEPMIND_K400, "test", num_crops=3, crop_size=200)


def test_onnx_with_a_static_clip_length_predicts_any_video_length(setup, tmp_path):
    pytest.importorskip("onnxruntime")
    deepmind, _mmaction, short, long = setup
    onnx_path = tmp_path / "deepmind.onnx"
    export = runner.invoke(app, ["export", "--weights", str(deepmind), "-o", str(onnx_path)])
    assert export.exit_code == 0 and "(1, 3, 32, 32, 32)" in export.output, export.output
    assert "clips of 32 frames" in export.output
    for video in (short, long):  # 12 and 60 frames, around the exported 32
        args = ["predict", str(video), "--json", "--top-k", "5", "--weights"]
        exported = _json(runner.invoke(app, [*args, str(onnx_path), "--backend", "onnx"]))
        ours = _json(runner.invoke(app, [*args, str(deepmind), "--clip-len", "32"]))
        assert [t["label"] for t in exported["top"]] == [t["label"] for t in ours["top"]]
        for a, b in zip(exported["top"], ours["top"], strict=True):
            assert a["score"] == pytest.approx(b["score"], rel=1e-4, abs=1e-6)
    args = ["predict", str(long), "--weights", str(onnx_path), "--backend", "onnx"]
    result = runner.invoke(app, [*args, "--clip-len", "16"])
    assert result.exit_code == 1 and "exported for clips of 32 frames, not 16" in result.output


def test_static_clip_length_of_om_and_dynamic_files():
    om_like = SimpleNamespace(input_shape=(1, 3, 16, 224, 224))  # OmRunner: always static
    overrides: dict = {}
    fit_exported_clip_len(Path("m.om"), om_like, overrides)
    assert overrides == {"clip_len": 16}
    dynamic_time: dict = {}
    fit_exported_clip_len(
        Path("m.onnx"), SimpleNamespace(input_shape=(None, 3, None, 8, 8)), dynamic_time
    )
    assert dynamic_time == {}
    with pytest.raises(InputError, match="re-export with `i3d export --clip-len 8`"):
        fit_exported_clip_len(Path("m.om"), om_like, {"clip_len": 8})
