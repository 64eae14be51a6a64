"""End-to-end predict / evaluate / features on a tiny saved model and generated videos."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner
from videogen import write_video

from i3d import get_preset, load_model
from i3d.cli.main import app
from i3d.data.pipeline import build_pipeline
from i3d.features.pooled import video_features
from i3d.inference import expand_inputs, predict_videos, read_predictions, summarize
from i3d.models import build_model
from i3d.models.recognizer import average_views
from i3d.weights.format import WeightsInfo, save_weights
from i3d.weights.preprocessing import MMACTION_K400, Preprocessing

LABELS = ("walk", "run", "jump", "swim", "sit")
runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    config = get_preset("i3d_r50", base_channels=4, num_classes=5)
    model = build_model(config)
    prep = attrs.evolve(
        MMACTION_K400,
        clip_len=8,
        num_clips=2,
        num_crops=3,
        resize_short=32,
        crop_size=32,
        input_size=32,
    )
    weights = save_weights(
        root / "tiny.safetensors", model.state_dict(), WeightsInfo(config, LABELS, prep)
    )
    videos = root / "videos"
    videos.mkdir()
    for i in range(3):
        write_video(videos / f"v{i}.mp4", 20 + 5 * i, width=48, height=32)
    return root, weights, videos


def test_predict_api_matches_model(setup):
    root, weights, videos = setup
    results = predict_videos([videos / "v0.mp4", root / "missing.mp4"], weights, batch_size=4)
    assert results[1].error is not None and "missing.mp4" in results[1].error
    scores = results[0].scores
    assert scores.shape == (5,) and scores.sum() == pytest.approx(1, abs=1e-5)
    model = load_model(weights)
    from i3d.data.pipeline import build_pipeline

    views = build_pipeline(model.weights_info.preprocessing, "test")(videos / "v0.mp4")
    assert views.shape == (6, 3, 8, 32, 32)
    expected = average_views(model(views[None]), "prob")[0]
    assert np.allclose(scores, expected.detach().numpy(), atol=1e-6)
    top = results[0].top(2)
    assert top[0][1] == LABELS[top[0][0]] and top[0][2] >= top[1][2]
    single = predict_videos([videos / "v0.mp4"], weights, clips=1, crops=1)[0]
    assert not np.allclose(single.scores, scores)


def test_predict_cli_table_json_csv(setup):
    root, weights, videos = setup
    result = runner.invoke(
        app,
        ["predict", str(videos), "--weights", str(weights), "--top-k", "2"],
        env={"COLUMNS": "300"},
    )
    assert result.exit_code == 0, result.output
    assert "v2.mp4" in result.output and "#2" in result.output
    csv_path = root / "out.csv"
    result = runner.invoke(
        app,
        [
            "predict",
            str(videos / "v*.mp4"),
            "--weights",
            str(weights),
            "--json",
            "--csv",
            str(csv_path),
            "--top-k",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["path"].rsplit("/", 1)[1] for r in records] == ["v0.mp4", "v1.mp4", "v2.mp4"]
    assert all(len(r["top"]) == 3 for r in records)
    assert len(csv_path.read_text().splitlines()) == 1 + 3 * 3


def test_decoding_workers_keep_order_scores_and_failures(setup, tmp_path):
    _root, weights, videos = setup
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"garbage")
    inputs = [videos / "v2.mp4", bad, videos / "v0.mp4", videos / "v1.mp4"]
    serial = predict_videos(inputs, weights, workers=0)
    ahead = predict_videos(inputs, weights, workers=2)
    assert [p.path for p in ahead] == inputs
    assert ahead[1].scores is None and "bad.mp4" in ahead[1].error
    for a, b in zip(serial, ahead, strict=True):
        assert a.error == b.error
        assert (a.scores is None) == (b.scores is None)
        if a.scores is not None:
            np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-7)


def test_predict_cli_failures(setup, tmp_path):
    _root, weights, videos = setup
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"garbage")
    result = runner.invoke(
        app, ["predict", str(videos / "v0.mp4"), str(bad), "--weights", str(weights)]
    )
    assert result.exit_code == 1
    assert "1 of 2 inputs failed" in result.output and "bad.mp4" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["predict", str(empty), "--weights", str(weights)])
    assert result.exit_code == 1 and "holds no videos" in result.output
    result = runner.invoke(app, ["predict", str(videos), "--weights", str(weights), "--crops", "5"])
    assert result.exit_code == 1 and "num_crops" in result.output
    with pytest.raises(ValueError, match="matches no files"):
        expand_inputs([str(tmp_path / "*.avi")])


def test_evaluate_and_rescore(setup, tmp_path):
    _root, weights, videos = setup
    (tmp_path / "list.txt").write_text("v0.mp4 0\nv1.mp4 3\nv2.mp4 1\nmissing.mp4 2\n")
    out = tmp_path / "eval"
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(tmp_path / "list.txt"),
            "--weights",
            str(weights),
            "--data-root",
            str(videos),
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples"] == 3 and metrics["skipped"] == 1
    scored = read_predictions(out / "predictions.jsonl")
    assert [s.label for s in scored] == [0, 3, 1]
    assert summarize(scored)["top1"] == metrics["top1"]
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (out / "per_class.csv").read_text().splitlines()
    assert rows[0] == "index,label,samples,accuracy" and rows[1].startswith('0,"walk",1,')
    again = tmp_path / "again"
    result = runner.invoke(
        app, ["evaluate", "--from-predictions", str(out / "predictions.jsonl"), "-o", str(again)]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((again / "metrics.json").read_text())["top1"] == metrics["top1"]
    rescore = ["evaluate", "--from-predictions", str(out / "predictions.jsonl")]
    result = runner.invoke(app, [*rescore, "--limit", "2", "-o", str(tmp_path / "two")])
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["samples"] == 2
    result = runner.invoke(app, [*rescore, str(tmp_path / "list.txt"), "-o", str(tmp_path / "x")])
    assert result.exit_code == 1 and "drop the annotation list" in result.output
    assert not (tmp_path / "x").exists()  # nothing created for a refused run


def test_evaluate_rejects_bad_lists(setup, tmp_path):
    _root, weights, videos = setup
    (tmp_path / "range.txt").write_text("v0.mp4 7\n")
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(tmp_path / "range.txt"),
            "--weights",
            str(weights),
            "--data-root",
            str(videos),
            "-o",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 1 and "out of range" in result.output
    (tmp_path / "broken.txt").write_text("v0.mp4\n")
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(tmp_path / "broken.txt"),
            "--weights",
            str(weights),
            "-o",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 1 and "broken.txt:1" in result.output


def test_features_safetensors_and_resume(setup, tmp_path):
    _root, weights, videos = setup
    out = tmp_path / "feats.safetensors"
    args = [
        "features",
        str(videos / "v0.mp4"),
        str(videos / "v1.mp4"),
        "--endpoint",
        "layer4",
        "--weights",
        str(weights),
        "-o",
        str(out),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    with safe_open(str(out), framework="pt") as fh:
        assert list(fh.metadata()) == ["i3d.features"]  # one key: the same bytes every run
        stored = json.loads(fh.metadata()["i3d.features"])
        paths, first = stored["videos"], fh.get_tensor("0")
    assert stored["endpoint"] == "layer4" and stored["pool"] == "mean"
    assert [p.rsplit("/", 1)[1] for p in paths] == ["v0.mp4", "v1.mp4"]
    assert first.shape == (128,)
    args[3:3] = [str(videos / "v2.mp4")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "1 video written" in result.output
    assert "2 already there" in result.output
    with safe_open(str(out), framework="pt") as fh:
        assert len(json.loads(fh.metadata()["i3d.features"])["videos"]) == 3
        assert torch.equal(fh.get_tensor("0"), first)


def test_features_npy_dir_full_maps(setup, tmp_path):
    _root, weights, videos = setup
    out = tmp_path / "maps"
    args = [
        "features",
        str(videos),
        "--endpoint",
        "layer2",
        "--pool",
        "none",
        "--weights",
        str(weights),
        "-o",
        str(out),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    index = json.loads((out / "index.json").read_text())
    assert index["endpoint"] == "layer2" and len(index["files"]) == 3
    arr = np.load(out / next(iter(index["files"])))
    assert arr.ndim == 5 and arr.shape[0] == 1  # val pipeline: one view
    assert "0 videos written" in runner.invoke(app, args).output
    result = runner.invoke(app, [*args[:3], "nope", *args[4:]])
    assert result.exit_code == 1 and "unknown endpoint" in result.output


def test_features_follow_the_models_device_and_dtype(setup, tmp_path):
    _root, weights, videos = setup
    model = load_model(weights)
    pipeline = build_pipeline(model.weights_info.preprocessing, "val")
    single = video_features(model, pipeline, videos / "v0.mp4", "layer4")
    double = video_features(
        load_model(weights, dtype=torch.float64), pipeline, videos / "v0.mp4", "layer4"
    )
    assert double.dtype == torch.float64
    torch.testing.assert_close(double.float(), single, rtol=1e-4, atol=1e-5)
    base = ["features", str(videos / "v0.mp4"), "--endpoint", "layer4", "--weights", str(weights)]
    result = runner.invoke(app, [*base, "-o", str(tmp_path / "f.safetensors"), "--backend", "onnx"])
    assert result.exit_code == 1 and "use --backend torch" in result.output
    if not torch.cuda.is_available():
        result = runner.invoke(
            app, [*base, "-o", str(tmp_path / "f.safetensors"), "--device", "cuda:0"]
        )
        assert result.exit_code == 1 and "CUDA is not available" in result.output
    assert not (tmp_path / "f.safetensors").exists()


def test_predict_on_an_exported_onnx_file(setup, tmp_path):
    pytest.importorskip("onnxruntime")
    _root, weights, videos = setup
    cli_path = tmp_path / "cli.onnx"  # clip length and size default to the weights' protocol
    result = runner.invoke(app, ["export", "--weights", str(weights), "-o", str(cli_path)])
    assert result.exit_code == 0 and "(1, 3, 8, 32, 32)" in result.output, result.output
    args = ["predict", str(videos / "v1.mp4"), "--json", "--top-k", "5", "--weights"]
    ours = json.loads(runner.invoke(app, [*args, str(weights)]).output)
    result = runner.invoke(app, [*args, str(cli_path), "--backend", "onnx"])
    assert result.exit_code == 0, result.output
    exported = json.loads(result.output)
    assert [t["label"] for t in exported["top"]] == [t["label"] for t in ours["top"]]
    for a, b in zip(exported["top"], ours["top"], strict=True):
        assert a["score"] == pytest.approx(b["score"], rel=1e-4, abs=1e-6)


def test_features_never_overwrite_other_files_or_mix_settings(setup, tmp_path):
    _root, weights, videos = setup
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(weights.read_bytes())
    base = ["features", str(videos / "v0.mp4"), "--weights", str(weights)]
    for target, message in ((weights, "is the input"), (copy, "not an i3d features file")):
        result = runner.invoke(app, [*base, "--endpoint", "layer4", "-o", str(target)])
        assert result.exit_code == 1 and message in result.output, result.output
    assert copy.read_bytes() == weights.read_bytes()
    for out in (tmp_path / "f.safetensors", tmp_path / "npy"):
        first = runner.invoke(app, [*base, "--endpoint", "layer4", "-o", str(out)])
        assert first.exit_code == 0, first.output
        for change in (["--endpoint", "layer3"], ["--endpoint", "layer4", "--pool", "none"]):
            result = runner.invoke(app, [*base, *change, "-o", str(out)])
            assert result.exit_code == 1 and "other settings" in result.output, result.output
    crowded = tmp_path / "crowded"
    crowded.mkdir()
    (crowded / "notes.txt").write_text("mine")
    result = runner.invoke(app, [*base, "--endpoint", "layer4", "-o", str(crowded)])
    assert result.exit_code == 1 and "not an i3d features folder" in result.output


def test_prediction_repr_top_k_and_output_checks(setup, tmp_path):
    _root, weights, videos = setup
    (prediction,) = predict_videos([videos / "v0.mp4"], weights)
    best = prediction.top(1)[0][1]
    assert repr(prediction).startswith("Prediction(path=") and f"'{best}':" in repr(prediction)
    result = runner.invoke(
        app,
        ["predict", str(videos / "v0.mp4"), "--weights", str(weights), "--top-k", "50"],
        env={"COLUMNS": "300"},
    )
    assert result.exit_code == 0 and "#5" in result.output and "#6" not in result.output
    for csv, message in ((tmp_path, "is a folder"), (tmp_path / "no" / "x.csv", "does not exist")):
        args = ["predict", str(videos / "v0.mp4"), "--weights", str(weights), "--csv", str(csv)]
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and message in result.output


def test_predict_on_a_folder_of_extracted_frames(setup, tmp_path):
    from PIL import Image

    from i3d.data.decode import open_video

    _root, weights, videos = setup
    frames = tmp_path / "clip_frames"
    frames.mkdir()
    with open_video(videos / "v1.mp4") as reader:
        for i, frame in enumerate(reader.get_frames(range(reader.num_frames))):
            Image.fromarray(frame).save(frames / f"img_{i + 1:05d}.jpg", quality=98)
    args = ["predict", str(frames), "--weights", str(weights), "--json", "--top-k", "5"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    from_frames = json.loads(result.output)
    from_video = predict_videos([videos / "v1.mp4"], weights)[0]
    assert from_frames["path"] == str(frames)
    frame_scores = {t["label"]: t["score"] for t in from_frames["top"]}
    gaps = [abs(frame_scores[name] - score) for _, name, score in from_video.top(5)]
    assert max(gaps) < 0.01  # the same clip, up to JPEG re-encoding


def test_evaluate_on_only_unreadable_videos_names_the_first_error(setup, tmp_path):
    _root, weights, _videos = setup
    (tmp_path / "text.mp4").write_text("not a video\n")
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "list.txt").write_text("text.mp4 0\nempty.mp4 1\nmissing.mp4 2\n")
    args = ["evaluate", str(tmp_path / "list.txt"), "--weights", str(weights)]
    args += ["--data-root", str(tmp_path), "-o", str(tmp_path / "out"), "--workers", "0"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "none of the 3 samples could be read; first:" in result.output
    assert "text.mp4: not a readable video" in result.output
    assert not (tmp_path / "out").exists()


def test_a_single_path_string_is_not_split_into_characters(setup):
    _root, weights, videos = setup
    path = str(videos / "v0.mp4")
    with pytest.raises(ValueError, match="expected a list of video paths, got the single path"):
        predict_videos(path, weights)
    [result] = predict_videos([path], weights)
    assert result.error is None and result.scores.shape == (5,)


def test_an_every_frame_protocol_stores_one_clip():
    every_frame = Preprocessing(clip_len=None, num_clips=3)
    with pytest.raises(ValueError, match=r"stores num_clips=3.*--clips N.*--clip-len T"):
        build_pipeline(every_frame, "test")


def test_features_files_of_earlier_versions_still_resume(tmp_path):
    """Files that spelled each setting as its own metadata key (before the one-key form)."""
    from safetensors.torch import save_file

    from i3d.features.store import FeatureSetting, open_feature_store

    setting = FeatureSetting("layer4", "mean", "ab" * 32, "val 1x1")
    old = {f"i3d.{k}": v for k, v in setting.as_dict().items()}
    old["i3d.videos"] = json.dumps(["a.mp4"])
    save_file({"0": torch.ones(3)}, str(tmp_path / "old.safetensors"), metadata=old)
    store = open_feature_store(tmp_path / "old.safetensors", setting)
    assert store.has(Path("a.mp4")) and not store.has(Path("b.mp4"))
    store.add(Path("b.mp4"), torch.zeros(3))
    store.save()
    again = open_feature_store(tmp_path / "old.safetensors", setting)
    assert again.has(Path("a.mp4")) and again.has(Path("b.mp4"))


def test_predict_and_evaluate_take_a_precision_and_backend_options(setup, tmp_path):
    """--precision and -O reach the backend's runner: bf16 on the torch CPU backend stays
    close to fp32 with the same top-1, and an option or precision it cannot take is one line."""
    root, weights, videos = setup
    args = ["predict", str(videos / "v0.mp4"), "--weights", str(weights), "--json"]
    fp32 = json.loads(runner.invoke(app, args).output)
    result = runner.invoke(app, [*args, "--precision", "bf16", "-O", "channels_last=false"])
    assert result.exit_code == 0, result.output
    bf16 = json.loads(result.output)
    assert bf16["top"][0]["label"] == fp32["top"][0]["label"]
    assert bf16["top"][0]["score"] == pytest.approx(fp32["top"][0]["score"], abs=0.03)
    assert bf16["top"][0]["score"] != fp32["top"][0]["score"]  # it did run in bf16
    for extra, message in ((["-O", "nonsense=1"], "nonsense"), (["-O", "novalue"], "key=value")):
        result = runner.invoke(app, [*args, *extra])
        assert result.exit_code == 1 and message in result.output, result.output
        assert "Traceback" not in result.output
    (root / "one.txt").write_text("v0.mp4 0\n")
    result = runner.invoke(app, ["evaluate", str(root / "one.txt"), "--data-root", str(videos),
                                 "--weights", str(weights), "--precision", "fp64",
                                 "-o", str(tmp_path / "e")])  # fmt: skip
    assert result.exit_code == 1 and "fp64" in result.output, result.output
