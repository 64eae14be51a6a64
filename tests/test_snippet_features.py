"""Snippet features (i3d.features): counts per tail rule, every preset against an independent
computation (all frames decoded, windows cut by hand), streaming, and the output folder."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import attrs
import av
import numpy as np
import pytest
import torch
from PIL import Image
from tinymodel import save_tiny_weights
from videogen import write_video

from i3d.data import transforms as T
from i3d.features import PRESETS, SnippetExtractor, SnippetProtocol, get_preset
from i3d.features.frames import frame_transform
from i3d.features.presets import PresetError, choose_streams
from i3d.models import build_model
from i3d.models import get_preset as model_preset
from i3d.weights.format import WeightsInfo, load_model, save_weights
from i3d.weights.preprocessing import DEEPMIND_K400


@pytest.mark.parametrize("frames", [1, 5, 15, 16, 17, 20, 21, 64, 65, 100])
def test_snippet_counts_follow_each_tail_rule(frames):
    w, s = 16, 4
    drop = SnippetProtocol(w, s, tail="drop")
    assert drop.count(frames) == (0 if frames < w else (frames - w) // s + 1)
    for tail in ("pad", "repeat", "loop"):
        covered = SnippetProtocol(w, s, tail=tail)
        count = covered.count(frames)
        assert count == 1 + max(0, -(-(frames - w) // s))
        starts = covered.starts(frames)
        assert starts[-1] + w >= frames > starts[-1]  # the last window reaches the last frame
    centred = SnippetProtocol(21, 1, anchor="center", tail="pad")
    assert centred.count(frames) == frames and centred.starts(frames)[0] == -10
    assert SnippetProtocol(64, 64, lookahead=1).count(frames) == (
        (frames - 1 - 64) // 64 + 1 if frames >= 65 else 0
    )


def test_published_count_formulas():
    """The counts each source's code gives (see the README's preset table)."""
    for n in (16, 17, 100, 1001):
        assert get_preset("actionformer-thumos14").protocol.count(n) == (n - 16) // 4 + 1
        assert get_preset("actionformer-anet").protocol.count(n) == (n - 16) // 16 + 1
        assert get_preset("rtfm").protocol.count(n) == -(-n // 16)
        assert get_preset("ms-tcn").protocol.count(n) == n
        assert get_preset("video-features").protocol.count(n) == max(0, (n - 65) // 64 + 1)
    # MS-TCN's batch_gen.py reads (2048, T), RTFM's dataset.py (T, 10, 2048), TAL (T, C)
    assert {p.name: p.layout for p in PRESETS.values()} == {
        "actionformer-thumos14": "tc", "actionformer-anet": "tc", "rtfm": "tkc", "ms-tcn": "ct",
        "video-features": "tc",
    }  # fmt: skip


def test_stored_layouts_are_axis_orders_of_the_computed_array():
    from i3d.features.output import stored_layout

    ten = np.arange(10 * 7 * 3, dtype=np.float32).reshape(10, 7, 3)  # (crops, snippets, C)
    one = ten[0]
    np.testing.assert_array_equal(stored_layout(ten, "tc"), ten)
    np.testing.assert_array_equal(stored_layout(ten, "ct"), ten.transpose(0, 2, 1))
    rtfm = stored_layout(ten, "tkc")
    assert rtfm.shape == (7, 10, 3) and rtfm.flags.c_contiguous
    np.testing.assert_array_equal(rtfm[4, 2], ten[2, 4])  # snippet 4 of crop 2
    np.testing.assert_array_equal(stored_layout(one, "ct"), one.T)
    assert stored_layout(one, "tkc").shape == (7, 1, 3)


def test_bad_protocols_and_presets_are_clear_errors():
    with pytest.raises(ValueError, match="centred windows"):
        SnippetProtocol(21, 1, anchor="center", tail="drop")
    with pytest.raises(ValueError, match="window must be a positive integer"):
        SnippetProtocol(0, 1)
    with pytest.raises(PresetError, match="unknown feature preset 'thumos'; choose one of"):
        get_preset("thumos")
    thumos = get_preset("actionformer-thumos14")
    with pytest.raises(PresetError, match=r"needs a Flow-stream I3D.*--stream rgb"):
        choose_streams(thumos, None, flow_weights=False)
    assert choose_streams(thumos, "rgb", flow_weights=False) == ("rgb",)
    assert choose_streams(thumos, None, flow_weights=True) == ("rgb", "flow")
    assert choose_streams(get_preset("rtfm"), None, flow_weights=False) == ("rgb",)
    with pytest.raises(PresetError, match="has the rgb stream only"):
        choose_streams(get_preset("rtfm"), "flow", flow_weights=True)
    assert choose_streams(None, None, flow_weights=True) == ("rgb", "flow")


# -- an independent computation ------------------------------------------------------------
def _all_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _resize(frames: np.ndarray, protocol: SnippetProtocol, short: int | None) -> np.ndarray:
    h, w = frames.shape[1:3]
    if protocol.frame_size is not None:
        size = protocol.frame_size
    elif protocol.size_rule == "floor":  # torchvision / PIL extractors truncate the long side
        size = (short, short * h // w) if w <= h else (short * w // h, short)
    else:
        size = (int(w * short / min(w, h) + 0.5), int(h * short / min(w, h) + 0.5))
    if protocol.resampler in (None, "cv2-bilinear"):  # T.resize is tested bit-exact vs OpenCV
        return T.resize(torch.from_numpy(frames), size, "bilinear").numpy()
    method = {"pil-bilinear": Image.BILINEAR, "pil-lanczos": Image.LANCZOS}[protocol.resampler]
    return np.stack([np.asarray(Image.fromarray(f).resize(size, method)) for f in frames])


def _crops(frames: np.ndarray, protocol: SnippetProtocol, c: int) -> list[np.ndarray]:
    h, w = frames.shape[1:3]
    centre = frames[:, (h - c) // 2 : (h - c) // 2 + c, (w - c) // 2 : (w - c) // 2 + c]
    if protocol.crops == 1:
        return [centre]
    assert protocol.crop_order == "torchvision"  # rtfm: TL, TR, BL, BR, C, then on the mirror
    out = []
    for img in (frames, frames[:, :, ::-1]):
        tl, tr = img[:, :c, :c], img[:, :c, w - c :]
        bl, br = img[:, h - c :, :c], img[:, h - c :, w - c :]
        top, left = round((h - c) / 2), round((w - c) / 2)
        out += [tl, tr, bl, br, img[:, top : top + c, left : left + c]]
    return out


def _reference(model, protocol: SnippetProtocol, path: Path, prep) -> np.ndarray:
    if protocol.batchnorm_eps is not None:  # the extractor's port normalises with its own eps
        model = copy.deepcopy(model)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.eps = protocol.batchnorm_eps
    frames = _all_frames(path)
    n = len(frames)
    short = protocol.resize_short or prep.resize_short
    crop = protocol.crop_size or prep.input_size
    low, high = protocol.value_range or prep.value_range
    mean = np.array(protocol.mean or prep.mean, dtype=np.float32)
    std = np.array(protocol.std or prep.std, dtype=np.float32)
    feats = []
    for cut in _crops(_resize(frames, protocol, short), protocol, crop):
        x = cut.astype(np.float32) * ((high - low) / 255.0) + low
        x = torch.from_numpy(((x - mean) / std).transpose(3, 0, 1, 2).copy())  # C, T, H, W
        rows = []
        for j in range(protocol.count(n)):
            first = j * protocol.stride - (
                protocol.window // 2 if protocol.anchor == "center" else 0
            )
            idx = np.arange(first, first + protocol.window)
            if protocol.tail == "loop":
                idx = np.where(idx < n, idx, first + (idx - first) % (n - first))
            clip = x[:, np.clip(idx, 0, n - 1)].clone()
            if protocol.tail == "pad":
                clip[:, (idx < 0) | (idx >= n)] = 0
            with torch.no_grad():
                fmap = model.endpoints(clip[None], [protocol.endpoint])[protocol.endpoint]
            if protocol.pool == "i3d":
                fmap = torch.nn.functional.avg_pool3d(fmap, (2, 7, 7), stride=1)
            rows.append(fmap.flatten(2).mean(2)[0])
        feats.append(torch.stack(rows).numpy())
    out = np.stack(feats)
    return out[0] if protocol.crops == 1 else out


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    torch.manual_seed(0)
    config = model_preset("inception_i3d_rgb", num_classes=4)
    path = tmp_path_factory.mktemp("inception") / "inception.safetensors"
    save_weights(path, build_model(config).state_dict(), WeightsInfo(config, None, DEEPMIND_K400))
    return load_model(path, "cpu")


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    path = save_tiny_weights(tmp_path_factory.mktemp("resnet") / "r.safetensors", ("a", "b"))
    return load_model(path, "cpu")


@pytest.mark.parametrize(
    ("name", "frames"),
    [("actionformer-thumos14", 20), ("actionformer-anet", 33), ("rtfm", 17), ("ms-tcn", 2),
     ("video-features", 66)],
)  # fmt: skip
def test_every_preset_matches_an_independent_computation(name, frames, inception, resnet, tmp_path):
    preset = get_preset(name)
    model = resnet if preset.model.startswith("i3d_r50") else inception
    video = write_video(tmp_path / "v.mp4", frames, width=64, height=48, fps=25)
    extractor = SnippetExtractor(model, preset.protocol, batch_size=2)
    result = extractor.video(video)
    assert result.ok, result.error
    expected = _reference(model, extractor.protocol, video, model.weights_info.preprocessing)
    assert result.features.shape == expected.shape
    assert result.features.shape[-2] == preset.protocol.count(frames) > 0
    scale = np.abs(expected).max()
    np.testing.assert_allclose(result.features, expected, rtol=0, atol=2e-5 * scale)
    if preset.protocol.batchnorm_eps is not None:  # it matters, and the caller's model is kept
        assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d))
        own = _reference(model, attrs.evolve(extractor.protocol, batchnorm_eps=None), video,
                         model.weights_info.preprocessing)  # fmt: skip
        assert np.abs(own - expected).max() > 1e-4 * scale


def test_fps_resampling_tails_and_timestamps(resnet, tmp_path):
    """At another fps the windows are cut from the resampled timeline; times follow it."""
    video = write_video(tmp_path / "v.mp4", 50, width=48, height=40, fps=25)
    protocol = SnippetProtocol(8, 8, fps=10.0, tail="pad", endpoint="layer4")
    result = SnippetExtractor(resnet, protocol, batch_size=3).video(video)
    ticks = np.minimum(np.floor(np.arange(20) * 2.5), 49).astype(int)  # 20 frames at 10 fps
    assert result.timeline.ticks == 20 and result.features.shape[0] == 3
    np.testing.assert_array_equal(result.times[:, 0], [0, 8, 16])
    np.testing.assert_allclose(result.times[:, 2], [0.0, 0.8, 1.6])
    np.testing.assert_array_equal(result.times[:, 4], ticks[[0, 8, 16]])
    # the padded third window holds 4 real frames: frames 40, 42, 45, 47 of the video
    frames = _all_frames(video)[ticks[16:]]
    prep = attrs.evolve(frame_transform(protocol, resnet.weights_info.preprocessing))
    crop = T.center_crop(prep.resize(list(frames)), prep.crop_size)
    clip = torch.zeros((1, 3, 8, prep.crop_size, prep.crop_size))
    clip[0, :, :4] = prep.normalize(crop.permute(3, 0, 1, 2))
    with torch.no_grad():
        last = resnet.endpoints(clip, ["layer4"])["layer4"].flatten(2).mean(2)[0].numpy()
    np.testing.assert_allclose(result.features[2], last, atol=2e-5 * np.abs(last).max())


def test_videos_shorter_than_a_window(resnet, tmp_path):
    one = write_video(tmp_path / "one.mp4", 1, width=48, height=40)
    extractor = SnippetExtractor(resnet, SnippetProtocol(16, 4))
    empty = extractor.video(one)
    assert empty.ok and empty.features.shape == (0, extractor.dim) and empty.times.shape == (0, 6)
    padded = SnippetExtractor(resnet, SnippetProtocol(16, 4, tail="repeat")).video(one)
    assert padded.features.shape == (1, extractor.dim)


def test_presets_cite_their_source():
    for preset in PRESETS.values():
        assert preset.source and preset.published_weights and preset.streams[0] == "rgb"


# -- the output folder through the CLI -----------------------------------------------------
@pytest.fixture()
def videos(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    for i, n in enumerate((1, 6, 30)):
        write_video(folder / f"v{i}.mp4", n, width=48, height=40)
    (folder / "broken.mp4").write_bytes(b"not a video")
    return folder


def _features(args, expect=0):
    from typer.testing import CliRunner

    from i3d.cli.main import app

    result = CliRunner().invoke(app, ["features", *map(str, args)])
    assert result.exit_code == expect, result.output
    return result.output


def test_cli_folder_manifest_resume_and_verification(resnet, videos, tmp_path):
    weights = tmp_path / "w.safetensors"
    save_tiny_weights(weights, ("a", "b"))
    out = tmp_path / "feats"
    args = [videos, "--weights", weights, "--window", "8", "--stride", "4", "--tail", "pad",
            "-o", out]  # fmt: skip
    text = _features(args, expect=1)
    assert "3 videos written" in text and "broken.mp4" in text
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    by_video = {r["video"]: r for r in records}
    assert "error" in by_video["broken"]
    for i, frames in enumerate((1, 6, 30)):
        record = by_video[f"v{i}"]
        feats = np.load(out / f"v{i}.npy")
        assert feats.shape == (SnippetProtocol(8, 4, tail="pad").count(frames), 4 * 8)
        assert record["frames"] == frames and record["snippets"] == len(feats)
        assert record["settings"]["protocol"]["window"] == 8
        assert record["settings"]["frames"]["crop_size"] == 32
        assert {"torch", "av", "i3d"} <= set(record["versions"])
        times = (out / f"v{i}.times.csv").read_text().splitlines()
        assert times[0].startswith("snippet,start_frame,end_frame,start_s,end_s")
        assert len(times) == len(feats) + 1
    stamp = {f: (out / f).stat().st_mtime_ns for f in ("v0.npy", "v1.npy", "v2.npy")}
    # a damaged file is caught by its hash and made again; the others are kept untouched
    damaged = np.load(out / "v1.npy")
    damaged[0, 0] += 1
    np.save(out / "v1.npy", damaged)
    text = _features(args, expect=1)
    assert "1 video written" in text and "(2 already there)" in text
    assert (out / "v0.npy").stat().st_mtime_ns == stamp["v0.npy"]
    assert hashlib_of(out / "v1.npy") == by_video["v1"]["sha256"]
    # other settings are not mixed in: every video is made again
    text = _features([*args[:-2], "--crops", "10", "-o", out], expect=1)
    assert "3 videos written" in text
    ten = np.load(out / "v2.npy")
    assert ten.shape == (10, 7, 32)
    # MS-TCN's layout, (C, snippets) with crops first: the same numbers, another file
    text = _features([*args[:-2], "--crops", "10", "--layout", "ct", "-o", out], expect=1)
    assert "3 videos written" in text
    np.testing.assert_array_equal(np.load(out / "v2.npy"), ten.transpose(0, 2, 1))
    record = json.loads((out / "manifest.jsonl").read_text().splitlines()[-1])
    assert record["settings"]["layout"] == "ct" and record["shape"] == [10, 32, 7]


def test_ms_tcn_preset_writes_the_c_by_t_layout_ms_tcn_reads(tmp_path):
    """Its RGB stream alone, (C, T) as MS-TCN's batch_gen.py reads it: a column per frame."""
    weights = save_tiny_weights(tmp_path / "w.safetensors", ("a", "b"))
    three = write_video(tmp_path / "three.mp4", 3, width=64, height=48)
    ms_tcn = [three, "--weights", weights, "--preset", "ms-tcn", "--stream", "rgb",
              "--endpoint", "layer4", "-o", tmp_path / "m"]  # fmt: skip
    assert "1 video written" in _features(ms_tcn)
    assert np.load(tmp_path / "m" / "three.npy").shape == (32, 3)
    record = json.loads((tmp_path / "m" / "manifest.jsonl").read_text())
    assert record["settings"]["layout"] == "ct" and record["snippets"] == 3


def hashlib_of(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_refuses_what_it_must_not_write(videos, tmp_path):
    weights = save_tiny_weights(tmp_path / "w.safetensors", ("a", "b"))
    pooled = tmp_path / "pooled"
    pooled.mkdir()
    (pooled / "index.json").write_text("{}")
    text = _features([videos, "--weights", weights, "--window", "8", "-o", pooled], expect=1)
    assert "pooled features" in text
    twins = tmp_path / "twins"
    (twins / "a").mkdir(parents=True)
    (twins / "b").mkdir()
    for sub in ("a", "b"):
        write_video(twins / sub / "clip.mp4", 3, width=48, height=40)
    text = _features([twins, "--weights", weights, "--window", "8", "-o", tmp_path / "t"], 1)
    assert "would both write clip.npy" in text
    text = _features([videos, "--weights", weights, "--preset", "ms-tcn", "-o", tmp_path / "m"], 1)
    assert "--stream rgb" in text
    text = _features(
        [videos, "--weights", weights, "--window", "8", "--pool", "none", "-o", tmp_path / "x"], 1
    )
    assert "snippet mode" in text


def test_a_second_run_on_the_same_folder_is_refused(tmp_path):
    from i3d.features.output import SnippetFolder
    from i3d.utils.files import OutputError

    folder = SnippetFolder(tmp_path / "out")
    with folder.locked():
        second = SnippetFolder(tmp_path / "out")
        with pytest.raises(OutputError, match="another i3d run"), second.locked():
            pass
    with folder.locked():  # released once the first run is through
        pass


def test_an_interrupted_run_resumes_without_recomputing(videos, tmp_path, monkeypatch):
    """Ctrl-C after two videos: the rerun recovers their records and computes only the rest."""
    from i3d.distributed.sharded import RunIncomplete
    from i3d.features import SnippetJob, extract_snippets
    from i3d.features.output import SnippetFolder
    from i3d.inference import expand_inputs

    weights = save_tiny_weights(tmp_path / "w.safetensors", ("a", "b"))
    paths = [p for p in expand_inputs([videos]) if p.name != "broken.mp4"]
    job = SnippetJob(str(weights), SnippetProtocol(8, 4), str(tmp_path / "out"), workers=0)
    written = []
    real_write = SnippetFolder.write_video

    def write_then_stop(self, result, *args):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(result.path.name)
        return real_write(self, result, *args)

    monkeypatch.setattr(SnippetFolder, "write_video", write_then_stop)
    with pytest.raises(RunIncomplete):
        extract_snippets(paths, job)
    assert written == ["v0.mp4", "v1.mp4"] and (tmp_path / "out" / ".i3d-parts").is_dir()

    def write(self, result, *args):
        written.append(result.path.name)
        return real_write(self, result, *args)

    monkeypatch.setattr(SnippetFolder, "write_video", write)
    run = extract_snippets(paths, job)
    assert written == ["v0.mp4", "v1.mp4", "v2.mp4"] and run.reused == 2
    assert [r["video"] for r in run.records] == ["v0", "v1", "v2"]
    assert not (tmp_path / "out" / ".i3d-parts").exists()
    lines = (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(line)["video"] for line in lines] == ["v0", "v1", "v2"]


def test_two_processes_write_the_same_bytes_as_one(videos, tmp_path):
    weights = save_tiny_weights(tmp_path / "w.safetensors", ("a", "b"))
    outs = {}
    for world in (1, 2):
        outs[world] = tmp_path / f"out{world}"
        args = [videos, "--weights", weights, "--window", "8", "--stride", "3", "--tail",
                "repeat", "--world-size", world, "--workers", "0", "-o", outs[world]]  # fmt: skip
        assert "3 videos written" in _features(args, expect=1)
    names = sorted(p.name for p in outs[1].iterdir() if not p.name.startswith("."))
    assert names == sorted(p.name for p in outs[2].iterdir() if not p.name.startswith("."))
    for name in names:
        assert (outs[1] / name).read_bytes() == (outs[2] / name).read_bytes(), name


def test_a_window_too_short_for_the_model_is_a_clear_error(resnet):
    with pytest.raises(ValueError, match="snippets of 2 frames at 32x32 are too small"):
        SnippetExtractor(resnet, SnippetProtocol(2, 2))


def test_pooled_features_refuse_a_second_writer(videos, tmp_path):
    """Two runs writing one features file would lose videos: the second is refused."""
    from i3d.utils.files import exclusive_lock

    weights = save_tiny_weights(tmp_path / "w.safetensors", ("a", "b"))
    out = tmp_path / "f.safetensors"
    args = [videos / "v2.mp4", "--weights", weights, "--endpoint", "layer4", "-o", out]
    with exclusive_lock(tmp_path / ".f.safetensors.i3d-lock", str(out)):
        assert "another i3d run" in _features(args, expect=1)
    assert "1 video written" in _features(args)


def test_a_torchrun_job_writes_what_one_process_writes(videos, tmp_path):
    """Two torchrun ranks (env://): rank 0 plans and writes the manifest, both write videos."""
    import os
    import subprocess
    import sys

    from i3d.distributed.launch import free_port

    weights = save_tiny_weights(tmp_path / "w.safetensors", ("a", "b"))
    common = [videos / "v1.mp4", videos / "v2.mp4", "--weights", weights,
              "--window", "8", "--stride", "3", "--workers", "0", "-o"]  # fmt: skip
    _features([*common, tmp_path / "one"])
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", str(free_port()), "-m", "i3d"]  # fmt: skip
    proc = subprocess.run(
        [*launcher, "features", *map(str, [*common, tmp_path / "two"])],
        capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("2 videos written") == 1  # rank 0 alone reports
    for name in ("manifest.jsonl", "v1.npy", "v2.npy", "v2.times.csv"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


@pytest.mark.parametrize(
    ("protocol", "count"),
    [
        (SnippetProtocol(8, 3, tail="pad", endpoint="layer4"), 3),
        (SnippetProtocol(5, 1, anchor="center", tail="repeat", endpoint="layer4"), 14),
        (SnippetProtocol(8, 5, tail="drop", endpoint="layer4", flow_resolution="source"), 2),
        # video_features: a stack reads W + 1 frames, so flow keeps the RGB stacks (not 1)
        (SnippetProtocol(7, 6, tail="drop", lookahead=1, endpoint="layer4"), 2),
    ],
    ids=["start-pad", "center-repeat", "flow-at-source", "lookahead"],
)
def test_flow_snippets_match_flow_computed_on_all_frames(tmp_path, protocol, count):
    """The flow stream: TV-L1 between consecutive resized frames, scaled, cropped; W flow
    fields per snippet (W + 1 frames), one flow tick fewer than frames. Centred windows sit
    on frames (one snippet per frame, as RGB; MS-TCN's extractor): flow tick t goes from
    frame t to t + 1, and past the edges it is zero (copies of an edge frame do not move).
    Flow at the source resolution is TV-L1 of the decoded frames, its pixel field resized
    with OpenCV as the frames are (vectors not rescaled), as MS-TCN's extractor makes it."""
    import cv2

    from i3d.flow.params import TVL1Params
    from i3d.flow.recipe import FlowConfig, deepmind_flow, frame_flow, scale_flow

    model = load_model(_flow_weights(tmp_path), "cpu")
    video = write_video(tmp_path / "v.mp4", 14, width=48, height=40)
    flow = FlowConfig(tvl1=TVL1Params(nscales=2, warps=2, inner_iterations=5, outer_iterations=2))
    result = SnippetExtractor(model, protocol, batch_size=2, flow=flow).video(video)
    assert result.ok, result.error
    n_flow = 13
    centred = protocol.anchor == "center"
    starts = protocol.starts(14 if centred or protocol.lookahead else n_flow)
    assert result.features.shape == (count, 4 * 8) and len(starts) == count
    assert starts[0] == (-2 if centred else 0)
    frames = torch.from_numpy(_all_frames(video))
    resized = T.resize_short(frames, 32, "bilinear").numpy()
    if protocol.flow_resolution == "source":
        raw = frame_flow(frames[:-1].numpy(), frames[1:].numpy(), flow).permute(0, 2, 3, 1)
        size = (resized.shape[2], resized.shape[1])
        raw = np.stack([cv2.resize(f, size, interpolation=cv2.INTER_LINEAR) for f in raw.numpy()])
        fields = scale_flow(torch.from_numpy(raw), flow.bound).permute(3, 0, 1, 2)
    else:
        fields = deepmind_flow(resized, flow, layout="cthw")  # (2, 13, H, W)
    h, w = fields.shape[2:]
    fields = fields[:, :, (h - 24) // 2 : (h - 24) // 2 + 24, (w - 24) // 2 : (w - 24) // 2 + 24]
    rows = []
    for start in starts:
        idx = np.arange(start, start + protocol.window)
        clip = fields[:, np.clip(idx, 0, n_flow - 1)].clone()
        clip[:, (idx < 0) | (idx >= n_flow)] = 0
        with torch.no_grad():
            rows.append(model.endpoints(clip[None], ["layer4"])["layer4"].flatten(2).mean(2)[0])
    expected = torch.stack(rows).numpy()
    np.testing.assert_allclose(result.features, expected, atol=2e-5 * np.abs(expected).max())
    assert result.times[-1, 5] == 14  # the last window reads the video's last frame
    np.testing.assert_array_equal(result.times[:, 0], starts)


def _flow_weights(folder: Path) -> Path:
    """A tiny Flow-stream ResNet3d (2 input channels), 24 px crops of a 32 px short side."""
    torch.manual_seed(0)
    config = model_preset("i3d_r50", depth=18, base_channels=4, in_channels=2, num_classes=2)
    prep = attrs.evolve(
        DEEPMIND_K400, modality="flow", resize_short=32, crop_size=24, input_size=24
    )  # fmt: skip
    path = folder / "flow.safetensors"
    return save_weights(path, build_model(config).state_dict(), WeightsInfo(config, None, prep))


def test_cli_two_streams_concatenate_rgb_then_flow(videos, tmp_path):
    rgb = save_tiny_weights(tmp_path / "w.safetensors", ("a", "b"), resize_short=32,
                            crop_size=24, input_size=24)  # fmt: skip
    flow = _flow_weights(tmp_path)
    video = write_video(tmp_path / "v12.mp4", 12, width=40, height=32)
    common = [video, "--weights", rgb, "--flow-weights", flow, "--window", "8",
              "--stride", "2", "--flow-impl", "torch", "-o"]  # fmt: skip
    outs = {}
    for stream in ("rgb", "flow", "both"):
        outs[stream] = tmp_path / stream
        assert "1 video written" in _features([*common, outs[stream], "--stream", stream])
    both = np.load(outs["both"] / "v12.npy")
    alone = {s: np.load(outs[s] / "v12.npy") for s in ("rgb", "flow")}
    # 12 frames: 3 RGB windows; 11 flow fields give 2, so the two-stream snippets are those 2
    assert alone["rgb"].shape == (3, 32) and alone["flow"].shape == (2, 32)
    joined = np.concatenate([alone["rgb"][:2], alone["flow"]], axis=1)
    np.testing.assert_array_equal(both, joined)
    # centred windows (MS-TCN): both streams one snippet per frame, nothing cut
    centred = [video, "--weights", rgb, "--flow-weights", flow, "--window", "5", "--stride", "1",
               "--anchor", "center", "--tail", "repeat", "--flow-impl", "torch", "-o",
               tmp_path / "c"]  # fmt: skip
    assert "1 video written" in _features(centred)
    assert np.load(tmp_path / "c" / "v12.npy").shape == (12, 64)
    record = json.loads((outs["both"] / "manifest.jsonl").read_text())
    assert record["settings"]["streams"] == ["rgb", "flow"]
    assert (
        record["settings"]["flow"]["impl"] == "torch"
        and "flow_weights_sha256" in record["settings"]
    )
    text = _features(
        [videos / "v2.mp4", "--weights", flow, "--window", "8", "-o", tmp_path / "x"], 1
    )
    assert "optical-flow model" in text
