"""Annotation lists, VideoDataset skipping, DataLoader collation, metrics, toy dataset."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from typer.testing import CliRunner
from videogen import pattern_frame, write_video

from i3d.cli.main import app
from i3d.data.datasets import (
    AnnotationError,
    VideoDataset,
    check_labels,
    load_annotations,
    skip_collate,
    worker_init,
    worker_loader,
)
from i3d.data.metrics import mean_class_accuracy, per_class_accuracy, top_k_accuracy
from i3d.data.pipeline import build_pipeline
from i3d.data.toy import ToySpec, make_toy_dataset
from i3d.utils.files import OutputError
from i3d.weights.labels import kinetics_labels
from i3d.weights.preprocessing import MMACTION_K400

SMALL = {"clip_len": 4, "resize_short": 32, "input_size": 32}


def test_video_list_and_rawframes_list(tmp_path):
    (tmp_path / "videos.txt").write_text("a.mp4 3\nsub/b c.mp4 1\n\n")
    samples = load_annotations(tmp_path / "videos.txt", tmp_path)
    assert [(s.path, s.label, s.total_frames) for s in samples] == [
        (tmp_path / "a.mp4", 3, None),
        (tmp_path / "sub/b c.mp4", 1, None),
    ]
    (tmp_path / "frames.txt").write_text("clip1 120 4\nclip2 7 0\n")
    samples = load_annotations(tmp_path / "frames.txt", tmp_path)
    assert [(s.path.name, s.total_frames, s.label) for s in samples] == [
        ("clip1", 120, 4),
        ("clip2", 7, 0),
    ]
    assert samples[1].source.endswith("frames.txt:2")


def test_bad_list_lines(tmp_path):
    (tmp_path / "bad.txt").write_text("a.mp4 3\nb.mp4 three\n")
    with pytest.raises(AnnotationError, match=r"bad\.txt:2.*path label"):
        load_annotations(tmp_path / "bad.txt", tmp_path)
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(AnnotationError, match="empty"):
        load_annotations(tmp_path / "empty.txt")
    with pytest.raises(AnnotationError, match="does not exist"):
        load_annotations(tmp_path / "nope.txt")
    (tmp_path / "ok.txt").write_text("a.mp4 3\nb.mp4 9\n")
    with pytest.raises(AnnotationError, match=r"ok\.txt:2 \(label 9\)"):
        check_labels(load_annotations(tmp_path / "ok.txt"), num_classes=5)


def test_kinetics_csv(tmp_path):
    names = kinetics_labels(400)
    (tmp_path / "val.csv").write_text(
        "label,youtube_id,time_start,time_end,split\n"
        f"{names[0]},abc,5,15,val\n"
        f"{names[399]},x-y_z,130,140,val\n"
    )
    (tmp_path / names[399]).mkdir()
    nested = tmp_path / names[399] / "x-y_z_000130_000140.mp4"
    nested.write_bytes(b"")
    samples = load_annotations(tmp_path / "val.csv", tmp_path)
    assert samples[0].path == tmp_path / "abc_000005_000015.mp4" and samples[0].label == 0
    assert samples[1].path == nested and samples[1].label == 399
    (tmp_path / "bad.csv").write_text(
        "label,youtube_id,time_start,time_end,split\nnot a class,a,1,2,v\n"
    )
    with pytest.raises(AnnotationError, match=r"bad\.csv:2.*unknown class"):
        load_annotations(tmp_path / "bad.csv", tmp_path)


def test_folder_per_class(tmp_path):
    for cls, n in (("walk", 2), ("run", 1)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            (tmp_path / cls / f"{i}.mp4").write_bytes(b"")
    (tmp_path / "run" / "notes.txt").write_text("x")
    samples = load_annotations(tmp_path)
    assert [(s.path.parent.name, s.label) for s in samples] == [
        ("run", 0),
        ("walk", 1),
        ("walk", 1),
    ]
    samples = load_annotations(tmp_path, labels=["walk", "run", "jump"])
    assert [s.label for s in samples] == [1, 0, 0]
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    with pytest.raises(AnnotationError, match="no videos"):
        load_annotations(empty)


def test_dataset_skips_and_counts_bad_samples(tmp_path):
    write_video(tmp_path / "good.mp4", 12, width=40, height=32)
    (tmp_path / "corrupt.mp4").write_bytes(b"not a video at all")
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(8):
        Image.fromarray(pattern_frame(i, 40, 32)).save(frames / f"img_{i + 1:05d}.jpg")
    (tmp_path / "list.txt").write_text("good.mp4 1\ncorrupt.mp4 0\nmissing.mp4 2\n")
    samples = load_annotations(tmp_path / "list.txt", tmp_path)
    samples += load_annotations(_write(tmp_path / "raw.txt", "frames 8 3\n"), tmp_path)
    dataset = VideoDataset(samples, build_pipeline(MMACTION_K400, "train", **SMALL), seed=1)
    assert len(dataset) == 4
    clip, label = dataset[0]
    assert clip.shape == (1, 3, 4, 32, 32) and label == 1
    assert dataset[1] is None and dataset[2] is None and dataset.num_skipped == 2
    assert dataset[3][0].shape == (1, 3, 4, 32, 32)
    assert torch.equal(dataset[0][0], clip)  # same (seed, epoch, index) → same draw
    draws = []
    for epoch in range(1, 6):
        dataset.set_epoch(epoch)
        draws.append(dataset[0][0])
        assert torch.equal(dataset[(epoch, 0)][0], draws[-1])  # epoch carried by the key
    assert any(not torch.equal(d, clip) for d in draws)
    assert torch.equal(dataset[(0, 0)][0], clip)


def test_dataloader_with_workers_drops_skipped(tmp_path):
    for i in range(3):
        write_video(tmp_path / f"{i}.mp4", 10, width=40, height=32)
    (tmp_path / "bad.mp4").write_bytes(b"")
    (tmp_path / "list.txt").write_text("0.mp4 0\nbad.mp4 1\n1.mp4 1\n2.mp4 2\n")
    samples = load_annotations(tmp_path / "list.txt", tmp_path)
    dataset = VideoDataset(samples, build_pipeline(MMACTION_K400, "val", **SMALL))
    loader = DataLoader(
        dataset, batch_size=2, num_workers=2, collate_fn=skip_collate, worker_init_fn=worker_init
    )
    batches = [b for b in loader if b is not None]
    labels = torch.cat([b[1] for b in batches]).tolist()
    assert sorted(labels) == [0, 1, 2]
    assert batches[0][0].shape[1:] == (1, 3, 4, 32, 32)
    assert dataset.num_skipped == 1
    assert skip_collate([None, None]) is None


def _write(path, text):
    path.write_text(text)
    return path


def test_metrics_match_mmaction(reference):
    ref = json.loads((reference / "pipeline" / "metrics.json").read_text())
    ex = ref["example"]
    scores, labels = np.array(ex["scores"]), np.array(ex["labels"])
    assert top_k_accuracy(scores, labels, ex["top_k_accuracy"]["topk"]) == pytest.approx(
        ex["top_k_accuracy"]["result"], abs=0
    )
    assert mean_class_accuracy(scores, labels) == ex["mean_class_accuracy"]
    quirk = ref["quirk_example"]
    assert mean_class_accuracy(np.array(quirk["scores"]), quirk["labels"]) == 0.5
    assert top_k_accuracy(np.array(quirk["scores"]), quirk["labels"], (1, 2)) == pytest.approx(
        quirk["top_k_accuracy"]["result"]
    )
    per_class = per_class_accuracy(np.array(quirk["scores"]), quirk["labels"])
    assert per_class[:3].tolist() == [0.5, 1.0, 0.5] and np.isnan(per_class[3:]).all()
    with pytest.raises(ValueError, match="expected scores"):
        top_k_accuracy(np.zeros((3, 2)), [0, 1])


def test_kinetics_csv_without_labels_is_refused(tmp_path):
    (tmp_path / "test.csv").write_text(
        "label,youtube_id,time_start,time_end,split\n"
        "abseiling,abc,5,15,test\n"
        ",def,0,10,test\n"
        ",ghi,3,13,test\n"
    )
    with pytest.raises(AnnotationError, match=r"test\.csv: 2 rows have no label.*test split"):
        load_annotations(tmp_path / "test.csv", tmp_path)


def test_class_folders_match_labels_with_underscores(tmp_path):
    labels = ["moving up", "moving down"]
    (tmp_path / "list.csv").write_text(
        "label,youtube_id,time_start,time_end,split\n"
        "moving up,abc,10,20,val\n"
        "moving_down,def,0,10,val\n"
    )
    for folder in ("moving_up", "moving down"):
        (tmp_path / folder).mkdir()
    up = tmp_path / "moving_up" / "abc_000010_000020.mp4"
    down = tmp_path / "moving down" / "def_000000_000010.mp4"
    up.write_bytes(b"")
    down.write_bytes(b"")
    samples = load_annotations(tmp_path / "list.csv", tmp_path, labels=labels)
    assert [(s.path, s.label) for s in samples] == [(up, 0), (down, 1)]
    folders = tmp_path / "folders"
    for folder in ("moving_up", "moving_down"):
        (folders / folder).mkdir(parents=True)
        (folders / folder / "a.mp4").write_bytes(b"")
    samples = load_annotations(folders, labels=labels)
    assert [(s.path.parent.name, s.label) for s in samples] == [
        ("moving_down", 1),
        ("moving_up", 0),
    ]
    with pytest.raises(AnnotationError, match=r"not in the label list: \['moving_down'\]"):
        load_annotations(folders, labels=["moving up", "moving sideways"])


def test_toy_dataset_rewrite_replaces_old_videos(tmp_path):
    out = tmp_path / "toy"
    make_toy_dataset(out, ToySpec(classes=3, videos_per_class=2, val_per_class=1, frames=4))
    assert len(list((out / "videos").iterdir())) == 9
    paths = make_toy_dataset(out, ToySpec(classes=2, videos_per_class=1, val_per_class=1, frames=4))
    named = {
        line.split()[0]
        for split in ("train", "val")
        for line in paths[split].read_text().splitlines()
    }
    assert {f"videos/{p.name}" for p in (out / "videos").iterdir()} == named
    assert len(named) == 4 and paths["labels"].read_text().splitlines() == [
        "moving up",
        "moving down",
    ]


def test_toy_dataset_refuses_a_folder_that_is_not_one(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    spec = ToySpec(classes=2, videos_per_class=1, val_per_class=1, frames=4)
    with pytest.raises(OutputError, match=r"not empty.*not a toy dataset.*thesis\.tex"):
        make_toy_dataset(tmp_path / "mine", spec)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["thesis.tex"]
    make_toy_dataset(tmp_path / "toy", spec)
    (tmp_path / "toy" / "videos" / "holiday.mp4").write_bytes(b"")
    with pytest.raises(OutputError, match=r"holiday\.mp4"):
        make_toy_dataset(tmp_path / "toy", spec)
    (tmp_path / "afile").write_text("x")
    result = CliRunner().invoke(app, ["make-toy-dataset", str(tmp_path / "afile")])
    assert result.exit_code == 1 and "is a file" in result.output
    assert (tmp_path / "afile").read_text() == "x"


def test_lists_and_csvs_with_a_byte_order_mark(tmp_path):
    (tmp_path / "list.txt").write_text("a b.mp4 1\r\nc.mp4\t0\r\n", encoding="utf-8-sig")
    samples = load_annotations(tmp_path / "list.txt", tmp_path)
    assert [(s.path, s.label) for s in samples] == [
        (tmp_path / "a b.mp4", 1),
        (tmp_path / "c.mp4", 0),
    ]
    names = kinetics_labels(400)
    (tmp_path / "val.csv").write_text(
        f"label,youtube_id,time_start,time_end,split\n{names[3]},abc,5,15,val\n",
        encoding="utf-8-sig",
    )
    assert load_annotations(tmp_path / "val.csv", tmp_path)[0].label == 3


def test_zero_frame_count_is_not_called_negative(tmp_path):
    (tmp_path / "frames.txt").write_text("clip_dir 0 1\n")
    with pytest.raises(AnnotationError, match=r"frame counts >= 1, got 'clip_dir 0 1'"):
        load_annotations(tmp_path / "frames.txt", tmp_path)


class _SignalHandlers(torch.utils.data.Dataset):
    """Reports, from inside a loader worker, whether it ignores Ctrl-C and SIGTERM."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> list[bool]:
        return [signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGINT, signal.SIGTERM)]


def test_loader_workers_leave_ctrl_c_to_the_main_process():
    loader = DataLoader(
        _SignalHandlers(), num_workers=1, worker_init_fn=worker_init, batch_size=None
    )
    assert next(iter(loader)) == [True, False]  # Ctrl-C ignored, SIGTERM still stops


class _Resized(torch.utils.data.Dataset):
    """One resize inside a loader worker."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> tuple[int, ...]:
        from i3d.data import transforms as T

        frames = torch.zeros((4, 720, 1280, 3), dtype=torch.uint8)
        return tuple(T.resize_short(frames, 256).shape)


def test_loader_workers_start_after_the_parent_used_opencv_threads():
    """A forked worker once hung for good in worker_init (cv2.setNumThreads after the parent's
    OpenCV thread pool had run)."""
    import cv2

    from i3d.data import transforms as T

    cv2.setNumThreads(2)
    T.resize_short(torch.zeros((8, 720, 1280, 3), dtype=torch.uint8), 256)  # pool started
    loader = DataLoader(
        _Resized(), num_workers=1, worker_init_fn=worker_init, batch_size=None, timeout=60
    )
    assert list(next(iter(loader))) == [4, 256, 455, 3]


def _terminated_worker() -> None:
    worker_init(0)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)  # not reached: SIGTERM ends the worker


def test_sigterm_ends_a_loader_worker_as_a_clean_exit():
    """Status 0, not 'killed by signal': torch would raise that anywhere in the main process."""
    proc = multiprocessing.get_context("spawn").Process(target=_terminated_worker)
    proc.start()
    proc.join(20)
    assert proc.exitcode == 0


class _Finalised:
    """Garbage in a reference cycle whose finaliser records the process that ran it."""

    def __init__(self, record: str) -> None:
        self.record = record
        self.cycle = self

    def __del__(self) -> None:
        with open(self.record, "a", encoding="utf-8") as fh:
            fh.write(f"{os.getpid()}\n")


class _Collecting(torch.utils.data.Dataset):
    """One item whose loading runs a full collection in the worker, as allocation would."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> int:
        import gc

        gc.collect()
        return os.getpid()


def test_loader_workers_never_finalise_the_parents_objects(tmp_path):
    """A worker that collected the parent's garbage ran destructors whose thread pools live
    only in the parent: an OpenVINO compiled model's hung the forked worker for good."""
    import gc

    record = tmp_path / "finalised"
    gc.disable()  # keep the cycle uncollected until the loader starts
    try:
        _Finalised(str(record))
        worker = next(iter(worker_loader(_Collecting(), 1, batch_size=None, timeout=60)))
    finally:
        gc.enable()
    assert worker != os.getpid()
    assert record.read_text().split() == [str(os.getpid())]
