"""``i3d predict`` / ``evaluate`` / ``features`` inputs, progress, CSV output and resume."""

from __future__ import annotations

import csv
import io
import json

import attrs
import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from rich.progress import Progress
from typer.testing import CliRunner
from videogen import pattern_frame, write_video

import i3d.cli.predict_cmds
from i3d import get_preset, load_model
from i3d.cli import predict_cmds
from i3d.cli.main import app
from i3d.data.pipeline import build_pipeline
from i3d.features.pooled import video_features
from i3d.inference import InputError, Predictor, expand_inputs, read_predictions
from i3d.models import build_model
from i3d.weights.format import WeightsInfo, save_weights
from i3d.weights.preprocessing import MMACTION_K400

LABELS = ("walk", "run", "jump", "swim", "sit")
runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 5-class tiny model (2 clips x 3 crops of 8x32x32) and three short videos."""
    root = tmp_path_factory.mktemp("predict_cli")
    torch.manual_seed(0)
    config = get_preset("i3d_r50", base_channels=4, num_classes=5)
    prep = attrs.evolve(
        MMACTION_K400, clip_len=8, num_clips=2, num_crops=3, resize_short=32, crop_size=32
    )
    weights = save_weights(
        root / "tiny.safetensors",
        build_model(config).state_dict(),
        WeightsInfo(config, LABELS, prep),
    )
    videos = root / "videos"
    videos.mkdir()
    for i in range(3):
        write_video(videos / f"v{i}.mp4", 20 + 5 * i, width=48, height=32)
    return root, weights, videos


def _frames(folder, count=10):
    folder.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(pattern_frame(i, 48, 32)).save(folder / f"img_{i + 1:05d}.jpg")
    return folder


def test_frame_folders_count_as_videos_in_globs_and_parent_folders(setup, tmp_path):
    _root, weights, _videos = setup
    frames = tmp_path / "frames"
    vid1, vid2 = _frames(frames / "vid1"), _frames(frames / "vid2")
    vid3 = _frames(frames / "more" / "vid3")
    _frames(frames / ".cache" / "hidden")
    (frames / "notes.txt").write_text("not a video\n")
    assert expand_inputs([frames]) == [vid3, vid1, vid2]
    assert expand_inputs([str(frames / "*")]) == [vid3, vid1, vid2]
    assert expand_inputs([str(frames / "**")]) == [vid3, vid1, vid2]
    assert expand_inputs([vid1]) == [vid1]
    with pytest.raises(InputError, match=r"matches 10 entries but no videos .*pass the folder"):
        expand_inputs([str(vid1 / "*")])
    with pytest.raises(InputError, match="no videos"):
        expand_inputs([str(frames / "*.txt")])
    args = ["predict", str(frames / "vid*"), "--weights", str(weights), "--workers", "0"]
    result = runner.invoke(app, [*args, "--clips", "1", "--crops", "1", "--json"])
    assert result.exit_code == 0, result.output
    paths = [json.loads(line)["path"] for line in result.stdout.splitlines()]
    assert paths == [str(vid1), str(vid2)]


def _evaluate(args, tmp_path):
    return runner.invoke(app, ["evaluate", *args, "--workers", "0", "-o", str(tmp_path / "eval")])


def test_evaluate_refuses_classes_the_model_does_not_have(setup, tmp_path, monkeypatch):
    _root, weights, videos = setup
    monkeypatch.setattr(i3d.cli.predict_cmds, "default_weights", lambda: weights)  # no --weights
    (tmp_path / "list.txt").write_text("v0.mp4 0\nv1.mp4 1\n")
    base = [str(tmp_path / "list.txt"), "--data-root", str(videos)]
    result = _evaluate(base, tmp_path)
    assert result.exit_code == 1 and "integer labels only" in result.output
    assert "--weights" in result.output and "--labels" in result.output
    assert not (tmp_path / "eval").exists()

    (tmp_path / "names.txt").write_text("run\nwalk\n")  # the list's 0 is the model's 1
    result = _evaluate([*base, "--labels", str(tmp_path / "names.txt")], tmp_path)
    assert result.exit_code == 0, result.output
    assert [s.label for s in read_predictions(tmp_path / "eval" / "predictions.jsonl")] == [1, 0]

    (tmp_path / "other.txt").write_text("run\ndance\n")
    result = _evaluate([*base, "--labels", str(tmp_path / "other.txt")], tmp_path)
    lacking = "classes of the list that the default model i3d_inception_k400_rgb (5 classes)"
    assert result.exit_code == 1 and f"{lacking} does not have: ['dance']" in result.output
    assert "--weights" in result.output

    tree = tmp_path / "tree"
    for name in ("dance", "walk"):
        (tree / name).mkdir(parents=True)
        (tree / name / "a.mp4").write_bytes((videos / "v0.mp4").read_bytes())
    result = _evaluate([str(tree)], tmp_path)
    assert result.exit_code == 1 and "['dance']" in result.output
    assert "i3d_inception_k400_rgb" in result.output and "--weights" in result.output


def test_progress_within_one_video(setup, monkeypatch):
    _root, weights, videos = setup
    calls = []
    predictor = Predictor(weights, batch_size=4)
    [prediction] = predictor.predict_many([videos / "v0.mp4"], 0, lambda *a: calls.append(a))
    assert prediction.error is None and calls == [(0, 6), (4, 6), (6, 6)]
    model = load_model(weights)
    calls.clear()
    pipeline = build_pipeline(model.weights_info.preprocessing, "test")
    record = lambda *a: calls.append(a)  # noqa: E731
    video_features(model, pipeline, videos / "v0.mp4", "layer4", batch_size=5, on_views=record)
    assert calls == [(0, 6), (5, 6), (6, 6)]

    screen = io.StringIO()  # a terminal that keeps the bars' last state
    terminal = Console(file=screen, force_terminal=True, width=100)
    columns = predict_cmds.new_progress().columns
    monkeypatch.setattr(predict_cmds, "new_progress", lambda: Progress(*columns, console=terminal))
    args = ["predict", str(videos / "v1.mp4"), "--weights", str(weights), "--batch-size", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "v1.mp4: views" in screen.getvalue() and "6/6" in screen.getvalue()


def _csv(path):
    with path.open(newline="") as fh:
        return list(csv.reader(fh))


def test_all_scores_in_json_and_csv(setup, tmp_path):
    _root, weights, videos = setup
    out = tmp_path / "scores.csv"
    args = ["predict", str(videos / "v0.mp4"), str(videos / "v1.mp4"), "--weights", str(weights)]
    result = runner.invoke(
        app, [*args, "--workers", "0", "--json", "--all-scores", "--csv", str(out)]
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    scores = np.array([r["scores"] for r in records])
    assert scores.shape == (2, 5) and np.allclose(scores.sum(1), 1, atol=1e-5)
    assert records[0]["top"][0]["score"] == pytest.approx(scores[0].max())
    header, *rows = _csv(out)
    assert header == ["path", "error", "warnings", *LABELS]
    assert [row[0] for row in rows] == [str(videos / "v0.mp4"), str(videos / "v1.mp4")]
    np.testing.assert_allclose([[float(x) for x in r[3:]] for r in rows], scores, rtol=1e-6)


def test_resume_skips_done_videos_retries_failed_ones_and_keeps_the_file(
    setup, tmp_path, monkeypatch
):
    _root, weights, videos = setup
    out = tmp_path / "out.csv"
    v0, v1, v2 = (str(videos / f"v{i}.mp4") for i in range(3))
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"garbage")
    base = [
        "predict",
        "--weights",
        str(weights),
        "--workers",
        "0",
        "--csv",
        str(out),
        "--top-k",
        "2",
    ]
    assert runner.invoke(app, [*base, v1]).exit_code == 0
    first = _csv(out)
    result = runner.invoke(app, [*base, v0, str(bad), v1, "--resume"])
    assert result.exit_code == 1 and "1 video already in" in result.stderr
    header, *rows = _csv(out)
    assert header == first[0] == ["path", "rank", "index", "label", "score", "error", "warnings"]
    assert [r[0] for r in rows] == [v0, v0, str(bad), v1, v1] and rows[3:] == first[1:]
    assert rows[2][5] and "bad.mp4" in rows[2][5]

    write_video(bad, 20, width=48, height=32)  # fixed: retried, the others are skipped
    result = runner.invoke(app, [*base, v0, str(bad), v1, "--resume"])
    assert result.exit_code == 0 and "2 videos already in" in result.stderr
    assert [r[0] for r in _csv(out)[1:]] == [v0, v0, str(bad), str(bad), v1, v1]

    kept = out.read_bytes()
    for extra, message in ((["--top-k", "3"], "not --top-k 3"), (["--all-scores"], "columns")):
        result = runner.invoke(app, [*base, v2, "--resume", *extra])
        assert result.exit_code == 1 and message in result.output, result.output
    mine = tmp_path / "mine.csv"
    mine.write_text("name,value\nx,1\n")
    result = runner.invoke(app, [*base[:-3], str(mine), v2, "--resume"])
    assert result.exit_code == 1 and "columns" in result.output
    assert out.read_bytes() == kept and mine.read_text() == "name,value\nx,1\n"
    result = runner.invoke(app, ["predict", v2, "--weights", str(weights), "--resume"])
    assert result.exit_code == 1 and "pass --csv OUT" in result.output

    real = Predictor._piece_logits
    seen = []

    def interrupted(self, piece, on_views=None):  # Ctrl-C as the second video starts
        seen.append(piece.start == 0)
        if sum(seen) == 2:
            raise KeyboardInterrupt
        return real(self, piece, on_views)

    monkeypatch.setattr(Predictor, "_piece_logits", interrupted)
    fresh = tmp_path / "fresh.csv"
    result = runner.invoke(app, [*base[:-3], str(fresh), "--top-k", "2", v2, v0])
    assert result.exit_code == 130 and "--resume" in result.stderr
    assert [r[0] for r in _csv(fresh)[1:]] == [v2, v2]


def test_a_csv_written_before_the_warnings_column_resumes(tmp_path):
    """--resume on a file without the warnings column reads it and writes the column."""
    from i3d.cli.predict_csv import PredictionTable

    old = tmp_path / "old.csv"
    old.write_text("path,rank,index,label,score,error\nv.mp4,1,0,walk,0.5,\nbad.mp4,,,,,broken\n")
    table = PredictionTable(1, False, ("walk", "run"), 2)
    table.load(old)
    assert table.done() == {"v.mp4"}
    table.save(old, ["v.mp4", "bad.mp4"])
    assert old.read_text().splitlines() == [
        "path,rank,index,label,score,error,warnings", "v.mp4,1,0,walk,0.5,,", "bad.mp4,,,,,broken,"
    ]  # fmt: skip
