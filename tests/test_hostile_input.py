"""Hostile input (issue 15): only trusted decoders, no blocking on special files, frame sizes
checked before anything is allocated; each gives a one-line VideoDecodeError."""

from __future__ import annotations

import functools
import json
import os
import re
import struct

import numpy as np
import pytest
from bounded import MiB, run_bounded
from PIL import Image
from videogen import write_video

from i3d.data.decode import VideoDecodeError, open_video


def _frames_dir(tmp_path, count=3):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(1, count + 1):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"img_{i:05d}.jpg")
    return folder


def test_a_postscript_frame_is_never_handed_to_ghostscript(tmp_path):
    folder = _frames_dir(tmp_path)
    (folder / "img_00002.jpg").write_bytes(
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    )
    with open_video(folder) as reader, pytest.raises(VideoDecodeError, match="not a JPEG/PNG"):
        reader.get_frames([0, 1])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifos_are_refused_before_anything_opens_them(tmp_path):
    folder = _frames_dir(tmp_path)
    os.unlink(folder / "img_00003.jpg")
    os.mkfifo(folder / "img_00003.jpg")  # opening it would block forever
    with open_video(folder) as reader, pytest.raises(VideoDecodeError, match="not a regular file"):
        reader.get_frames([2])
    os.mkfifo(tmp_path / "video.mp4")
    with pytest.raises(VideoDecodeError, match="not a regular file"):
        open_video(tmp_path / "video.mp4")


def test_a_png_bomb_is_refused_before_it_is_decoded(tmp_path, monkeypatch):
    folder = _frames_dir(tmp_path, count=1)
    Image.new("1", (6000, 6000)).save(folder / "img_00001.png")  # 4.5 MB of pixels, tiny file
    monkeypatch.setenv("I3D_MAX_FRAME_PIXELS", str(4000 * 4000))
    from i3d.data.decode import open_frames_dir

    with pytest.raises(VideoDecodeError, match=r"exceed the limit of 16,000,000 pixels.*I3D_MAX"):
        open_frames_dir(folder, template="img_{:05d}.png")
    monkeypatch.setenv("I3D_MAX_FRAME_PIXELS", str(6000 * 6000))
    assert open_frames_dir(folder, template="img_{:05d}.png").size == (6000, 6000)


def test_indirection_demuxers_are_not_used(tmp_path):
    """FFmpeg's concat demuxer (picked by content) would read another file; it is not allowed."""
    write_video(tmp_path / "real.mp4", 3)
    playlist = tmp_path / "clip.mp4"
    playlist.write_text("ffconcat version 1.0\nfile 'real.mp4'\n")
    with pytest.raises(VideoDecodeError, match="not a readable video"):
        open_video(playlist)


def test_nan_outputs_fail_the_video_instead_of_passing_as_an_answer(tmp_path):
    """Absurd preprocessing metadata (std 1e-38) makes the input inf and the logits NaN."""
    from tinymodel import save_tiny_weights
    from typer.testing import CliRunner

    from i3d.cli.main import app
    from i3d.features import SnippetExtractor, SnippetProtocol
    from i3d.weights.format import load_model

    weights = save_tiny_weights(tmp_path / "w.safetensors", ("a", "b"), std=(1e-38,) * 3)
    video = write_video(tmp_path / "v.mp4", 20, width=48, height=40)
    result = CliRunner().invoke(app, ["predict", str(video), "--weights", str(weights)])
    assert result.exit_code == 1 and "NaN/inf" in result.output and "i3d inspect" in result.output
    with pytest.raises(ValueError, match="NaN/inf"):  # refused when probing the window
        SnippetExtractor(load_model(weights), SnippetProtocol(8, 8))


def test_a_pickle_cannot_patch_allow_listed_functions(tmp_path):
    """GLOBAL torch._utils._rebuild_tensor_v2, then BUILD with a slot state: the C unpickler
    would setattr its __defaults__ for the rest of the process. Refused; a later load works."""
    import torch
    import torch._utils

    from i3d.weights.safe_pickle import UnsafePickleError, load_checkpoint, loads_restricted

    name = b"__defaults__"
    payload = (
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X" + len(name).to_bytes(4, "little")
        + name + b"K\x01\x85s\x86b."
    )  # fmt: skip
    before = torch._utils._rebuild_tensor_v2.__defaults__
    with pytest.raises(UnsafePickleError, match="sets attributes on '_rebuild_tensor_v2'"):
        loads_restricted(payload)
    assert torch._utils._rebuild_tensor_v2.__defaults__ == before
    for target in (b"ctorch\nTensor\n", b"cbuiltins\ndict\n"):
        with pytest.raises(UnsafePickleError, match="sets attributes"):
            loads_restricted(b"\x80\x02" + target + b"N}\x86b.")
    torch.save({"w": torch.arange(4.0)}, tmp_path / "ok.pth")
    assert torch.equal(load_checkpoint(tmp_path / "ok.pth")["w"], torch.arange(4.0))


def test_the_npy_feature_store_resumes_after_a_kill_at_any_point(tmp_path):
    """Killed after a video's file but before the index was rewritten, or mid-write (a temp
    file left): the next run knows the folder, counts the video as done, and cleans up."""
    import torch

    from i3d.features.store import FeatureSetting, open_feature_store

    setting = FeatureSetting("layer4", "mean", "ab" * 32, "val 1x1")
    out = tmp_path / "feats"
    store = open_feature_store(out, setting)  # the index exists from the start
    store.add(tmp_path / "a.mp4", torch.ones(3))  # ... then "kill -9": no save()
    (out / ".b-1234.npy.x1y2.tmp").write_bytes(b"half a file")
    again = open_feature_store(out, setting)
    assert again.has(tmp_path / "a.mp4") and not again.has(tmp_path / "b.mp4")
    assert not list(out.glob(".*.tmp"))
    again.save()
    index = json.loads((out / "index.json").read_text())
    assert list(index["files"].values()) == [str(tmp_path / "a.mp4")]


def test_metadata_larger_than_its_limit_is_refused():
    """(Deep nesting: a bounded case below.)"""
    from i3d.utils.untrusted import load_json

    with pytest.raises(ValueError, match="more than the 10 read"):
        load_json("[1, 2, 3, 4, 5]", "x", max_bytes=10)


def test_weight_files_record_a_tensor_digest_that_loading_checks(tmp_path):
    """Changing tensor bytes in place (header untouched) is caught by load_model."""
    from tinymodel import save_tiny_weights

    from i3d.weights.format import WeightsError, load_model, verify_tensors

    weights = save_tiny_weights(tmp_path / "w.safetensors", ("a", "b"))
    load_model(weights)
    verify_tensors(weights)
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # the last tensor's last bytes
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="does not match the digest"):
        load_model(weights)
    with pytest.raises(WeightsError, match="does not match the digest"):
        verify_tensors(weights)
    load_model(weights, verify=False)  # the opt-out, for speed on trusted files


def test_a_legacy_tar_checkpoint_with_a_fifo_member_is_refused(tmp_path):
    """torch.load extracts a tar checkpoint's members; a FIFO one would block it forever."""
    import io
    import tarfile

    from i3d.weights.format import WeightsError
    from i3d.weights.safe_pickle import load_checkpoint

    path = tmp_path / "legacy.pth"
    with tarfile.open(path, "w") as tar:
        for name in ("pickle", "tensors"):
            info = tarfile.TarInfo(name)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"\x80\x02N."))
        fifo = tarfile.TarInfo("storages")
        fifo.type = tarfile.FIFOTYPE
        tar.addfile(fifo)
    with pytest.raises(WeightsError, match="'storages' is not a regular file"):
        load_checkpoint(path)


def _claiming_pickle(numel: int, **kwargs) -> bytes:
    """A checkpoint pickle whose one tensor's storage claims ``numel`` float32 elements."""
    import io
    import pickle

    import torch

    tensor = object()

    class Claim(pickle.Pickler):
        def persistent_id(self, obj):
            if obj is tensor:
                return ("storage", torch.FloatStorage, "0", "cpu", numel, *kwargs.values())
            return None

    buf = io.BytesIO()
    Claim(buf, protocol=2).dump({"weight": tensor})
    return buf.getvalue()


def _legacy_claiming_checkpoint(path) -> None:
    """A legacy-format checkpoint of a few hundred bytes whose storage claims 3 GiB."""
    import io
    import pickle

    from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

    legacy = io.BytesIO()
    sys_info = {"protocol_version": PROTOCOL_VERSION, "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 4}}  # fmt: skip
    for header in (MAGIC_NUMBER, PROTOCOL_VERSION, sys_info):
        pickle.dump(header, legacy, protocol=2)
    legacy.write(_claiming_pickle(3 * 2**28, view_metadata=None))
    path.write_bytes(legacy.getvalue())


def test_a_tiny_checkpoint_claiming_gigabytes_is_refused_before_allocation(tmp_path, monkeypatch):
    """torch allocates each storage at the size the pickle names before reading its bytes:
    a few hundred bytes claiming 3 GiB (legacy and zip formats) are refused first."""
    import zipfile

    import torch

    from i3d.weights.safe_pickle import UnsafePickleError, load_checkpoint

    _legacy_claiming_checkpoint(tmp_path / "legacy.pth")
    with zipfile.ZipFile(tmp_path / "zip.pth", "w") as archive:
        archive.writestr("archive/data.pkl", _claiming_pickle(3 * 2**28))
        archive.writestr("archive/data/0", b"\0" * 16)
        archive.writestr("archive/version", "3\n")
    sizes = []
    real = torch.UntypedStorage

    class Spy(real):
        def __new__(cls, *args, **kwargs):
            sizes.extend(a for a in args if isinstance(a, int))
            return real(*args, **kwargs)

    monkeypatch.setattr(torch, "UntypedStorage", Spy)
    for name in ("legacy.pth", "zip.pth"):
        with pytest.raises(UnsafePickleError, match=r"claim at least 3,221,225,472 bytes, more"):
            load_checkpoint(tmp_path / name)
    assert not any(size > 2**20 for size in sizes)
    monkeypatch.setattr(torch, "UntypedStorage", real)
    good = tmp_path / "good.pth"
    torch.save({"w": torch.arange(6.0)}, good, _use_new_zipfile_serialization=False)
    assert load_checkpoint(good)["w"].tolist() == [0, 1, 2, 3, 4, 5]


def test_a_zip_checkpoint_member_that_inflates_past_the_file_is_refused(tmp_path):
    import zipfile

    from i3d.weights.format import WeightsError
    from i3d.weights.safe_pickle import load_checkpoint

    path = tmp_path / "bomb.pth"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        archive.writestr("archive/data/0", b"\0" * 2**22)  # 4 MiB from a few KB
    with pytest.raises(WeightsError, match="'archive/data/0' unpacks to 4,194,304 bytes"):
        load_checkpoint(path)


def _box(data: bytes, *path: bytes) -> int:
    """Offset of the ISO media box at ``path`` (moov, trak, ...) in an MP4 file's bytes."""
    start, end = 0, len(data)
    for kind in path:
        while data[start + 4 : start + 8] != kind:
            start += struct.unpack(">I", data[start : start + 4])[0]
            assert start < end, f"no {kind!r} box"
        end = start + struct.unpack(">I", data[start : start + 4])[0]
        found, start = start, start + 8
    return found


def _mp4_claiming_frames(path, count: int) -> None:
    """A 2 KB mp4 whose sample tables say ``count`` one-byte frames in one chunk."""
    data = bytearray(write_video(path, 10, width=32, height=32).read_bytes())
    stbl = (b"moov", b"trak", b"mdia", b"minf", b"stbl")
    struct.pack_into(">II", data, _box(data, *stbl, b"stsz") + 12, 1, count)
    struct.pack_into(">I", data, _box(data, *stbl, b"stts") + 16, count)
    struct.pack_into(">I", data, _box(data, *stbl, b"stsc") + 20, count)
    path.write_bytes(bytes(data))


def _gif_claiming_a_canvas(path) -> None:
    """A 48-byte GIF whose logical screen is 16000² (256 megapixels)."""
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    data[6:10] = struct.pack("<HH", 16000, 16000)
    path.write_bytes(bytes(data))


def _zip_with_a_pickle_bomb(path) -> None:
    """A torch zip checkpoint whose deflated data.pkl (1.4 MB) inflates to 320 MiB."""
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("archive/data.pkl", "w") as member:
            for _ in range(320):
                member.write(bytes(MiB))
        zf.writestr("archive/version", "3\n")


def _deeply_nested_labels(path) -> None:
    """Tiny weights whose labels are JSON nested 100k deep."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from tinymodel import save_tiny_weights

    weights = save_tiny_weights(path.parent / "w.safetensors", ("a", "b"))
    with safe_open(str(weights), framework="pt") as fh:
        meta = dict(fh.metadata())
    meta["i3d.labels"] = "[" * 100_000 + "]" * 100_000
    save_file(load_file(str(weights)), str(path), metadata=meta)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    from tinymodel import save_tiny_weights

    return save_tiny_weights(tmp_path_factory.mktemp("weights") / "w.safetensors", ("a", "b"))


#: name → (what to craft, the file's name, the command (FILE, WEIGHTS), its error)
BOUNDED_CASES = {
    "legacy-pickle-claims-3GiB": (
        _legacy_claiming_checkpoint, "legacy.pth", ["convert-weights", "FILE"],
        r"legacy\.pth: refusing to load: its tensors claim at least 3,221,225,472 bytes, more "
        r"than the 2\d\d-byte file holds",
    ),
    "zip-pickle-inflates-past-the-file": (
        _zip_with_a_pickle_bomb, "bomb.pth", ["convert-weights", "FILE"],
        r"bomb\.pth: archive member 'archive/data\.pkl' unpacks to 335,544,320 bytes, more than",
    ),
    "gif-canvas-16000x16000": (
        _gif_claiming_a_canvas, "big.gif", ["predict", "FILE", "--weights", "WEIGHTS"],
        r"big\.gif: frames of 16000x16000 \(256,000,000 pixels\) exceed the limit of "
        r"67,108,864 pixels; raise it with I3D_MAX_FRAME_PIXELS",
    ),
    "mp4-claims-50M-frames": (
        functools.partial(_mp4_claiming_frames, count=50_000_000), "claim.mp4",
        ["predict", "FILE", "--weights", "WEIGHTS"],
        r"claim\.mp4: its sample tables claim at least 50,000,000 bytes of frames and audio, "
        r"more than the 2,\d\d\d-byte file holds",
    ),
    "json-nested-100k-deep": (
        _deeply_nested_labels, "deep.safetensors", ["inspect", "FILE"],
        r"deep\.safetensors: corrupt i3d metadata: i3d\.labels is JSON nested too deeply",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", BOUNDED_CASES)
def test_a_file_claiming_more_than_it_holds_fails_in_bounded_memory_and_time(
    tmp_path, tiny_weights, case
):
    """Each hostile file (48 bytes to 1.4 MB) through the command a user would run,
    in a child whose address space may grow by only 512 MiB: exit 1, one line naming the
    file and the limit, RSS grown by under 100 MiB, done in seconds, nothing written."""
    from i3d.cli.main import app

    craft, name, command, message = BOUNDED_CASES[case]
    folder, tmpdir = tmp_path / "in", tmp_path / "tmp"
    folder.mkdir()
    tmpdir.mkdir()
    craft(folder / name)
    before = sorted(folder.iterdir())
    args = [{"FILE": str(folder / name), "WEIGHTS": str(tiny_weights)}.get(a, a) for a in command]
    if args[0] == "predict":
        args += ["--workers", "0"]
    done = run_bounded(lambda: app(args, prog_name="i3d"), tmpdir)
    lines = [line for line in done.lines() if not re.fullmatch(r"\d+ of \d+ inputs failed:", line)]
    assert done.status == 1, done.stderr
    assert len(lines) == 1 and re.search(message, lines[0]), done.stderr
    assert done.peak_rss < 100 * MiB, f"RSS grew by {done.peak_rss / MiB:.0f} MiB"
    assert done.seconds < 20
    assert sorted(folder.iterdir()) == before and not list(tmpdir.iterdir())


def test_a_video_of_more_frames_than_the_limit_is_refused_before_indexing(tmp_path, monkeypatch):
    """I3D_MAX_FRAMES: the frame count an mp4 header states is checked before the packets
    are indexed; a container that states none (Matroska) is stopped while indexing."""
    monkeypatch.setenv("I3D_MAX_FRAMES", "8")
    for name in ("v.mp4", "v.mkv"):
        video = write_video(tmp_path / name, 12, width=32, height=32)
        with pytest.raises(VideoDecodeError, match=r"more than 8 frames .*I3D_MAX_FRAMES=N"):
            open_video(video)
    monkeypatch.setenv("I3D_MAX_FRAMES", "12")
    assert open_video(video).num_frames == 12


def _leftovers(*folders) -> list[str]:
    """Temporary files or folders an interrupted write could leave in ``folders``."""
    return [
        str(p) for folder in folders for p in folder.rglob("*")
        if (p.name.startswith(".") and not p.name.endswith("-lock")) or "tmp" in p.name
    ]  # fmt: skip


@pytest.mark.parametrize(
    "command",
    [
        ["predict", "--csv", "OUT.csv"],
        ["features", "-o", "OUT.safetensors", "--endpoint", "layer4"],
        ["features", "-o", "OUT", "--endpoint", "layer4"],
    ],
    ids=["predict-csv", "features-safetensors", "features-npy"],
)
def test_an_output_that_does_not_fit_is_a_one_line_error_and_keeps_the_previous(
    tmp_path, command
):
    """A real kernel failure (the file-size limit, as on a full disk): a second run with one
    more video exits 1 with one line naming the file, the previous output stays
    byte-identical, and no temp file is left there or in TMPDIR. (A .npy folder may keep the
    new video's finished file: the next run adopts it.)"""
    from tinymodel import save_tiny_weights
    from typer.testing import CliRunner

    from i3d.cli.main import app

    weights = save_tiny_weights(tmp_path / "w.safetensors", ("a", "b"))
    videos = [str(write_video(tmp_path / f"v{i}.mp4", 12, width=40, height=32)) for i in (1, 2)]
    out_dir, tmpdir = tmp_path / "out", tmp_path / "tmp"
    out_dir.mkdir()
    tmpdir.mkdir()
    args = [a.replace("OUT", str(out_dir / "out")) for a in command]
    args += ["--weights", str(weights), "--workers", "0"]  # (shared memory has the limit too)
    first = CliRunner().invoke(app, [*args, videos[0]])
    assert first.exit_code == 0, first.output
    before = {p: p.read_bytes() for p in out_dir.rglob("*") if p.is_file() and "lock" not in p.name}
    limit = max(len(data) for data in before.values())
    done = run_bounded(lambda: app([*args, *videos], prog_name="i3d"), tmpdir, file_size=limit)
    status, printed = done.status, done.stdout + done.stderr
    lines = [line for line in printed.splitlines() if line.strip()]
    assert status == 1, printed
    assert re.match(rf"error: cannot write {out_dir}/\S+: file too large; ", lines[-1]), printed
    assert "Traceback" not in printed
    assert {p: p.read_bytes() for p in before} == before  # (a .npy folder may hold one more)
    assert _leftovers(out_dir, tmpdir) == []


def test_every_writer_that_runs_out_of_room_names_its_file_and_keeps_the_previous(tmp_path):
    """The writers whose libraries give no errno (torch's zip writer says "unexpected pos",
    safetensors and PIL only a message), a memory-mapped flow array (on a full disk a write
    to its pages would be SIGBUS) and an appended metrics line, under a 4 KiB file limit."""
    import hashlib

    import torch
    from tinymodel import save_tiny_weights

    from i3d.flow.store import FlowFolder, FlowSettings
    from i3d.train.checkpoint import save_checkpoint
    from i3d.train.report import MetricsLog
    from i3d.utils.files import OutputError
    from i3d.weights import hub

    big = torch.arange(4096.0)
    state = {"model": {"w": big}, "epoch": 1, "step": 2}
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write("train", 0, 1, loss=1.0)
    blob = tmp_path / "download.pth"
    blob.write_bytes(bytes(8192))
    flow = np.zeros((2, 80, 80, 2), np.float32)
    writers = {
        "checkpoints/epoch0001_step000000002.pt": lambda: save_checkpoint(tmp_path, state),
        "metrics.jsonl": lambda: log.write("train", 0, 2, loss=0.5, note="x" * 5000),
        "w.safetensors": lambda: save_tiny_weights(tmp_path / "w.safetensors", ("a", "b")),
        "cache/x.pth": lambda: hub.download(
            blob.as_uri(), tmp_path / "cache/x.pth", hashlib.sha256(bytes(8192)).hexdigest()
        ),
    }
    for fmt in ("npy", "mmaction"):
        folder = FlowFolder(tmp_path / fmt, FlowSettings(fmt, None, None, None, "opencv", {}, 20))
        folder.claim()
        frames = np.random.default_rng(0).integers(0, 255, (3, 80, 80, 3), np.uint8)
        writers[f"{fmt}/v{'.npy' if fmt == 'npy' else ''}"] = functools.partial(
            folder.write, "v", (2, 80, 80), [(flow, frames)]
        )
    (tmp_path / "cache").mkdir()
    for name in ("w.safetensors", "cache/x.pth", "npy/v.npy"):
        (tmp_path / name).write_bytes(b"previous")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def job() -> None:
        for name, write in writers.items():
            try:
                write()
                print(f"{name}: written")
            except OutputError as exc:
                print(f"{name}: {exc}")

    done = run_bounded(job, tmp_path, file_size=4096)
    assert done.status == 0, done.stdout + done.stderr
    printed = done.stdout
    lines = printed.splitlines()
    assert len(lines) == len(writers), printed
    for line, name in zip(lines, writers, strict=True):
        kept = "the previous" if (tmp_path / name).exists() else "nothing was written"
        assert line.startswith(f"{name}: cannot write {tmp_path / name}: file too large; {kept}")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert _leftovers(tmp_path) == []


def _truncated_mp4(tmp_path):
    """(an mp4 cut at 60% whose index, written first, still claims 40 frames; the whole file)"""
    import av
    from videogen import pattern_frame

    full = tmp_path / "full.mp4"
    with av.open(str(full), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        noise = np.random.default_rng(0).integers(0, 256, (40, 16, 48, 3), np.uint8)
        for i in range(40):
            picture = pattern_frame(i, 48, 32)
            picture[:16] = noise[i]  # noise above the index blocks: the frames take room
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode())
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full.read_bytes()[: int(full.stat().st_size * 0.6)])
    return cut, full


def test_a_truncated_video_is_read_as_far_as_it_goes_with_a_warning(tmp_path, caplog):
    """The frames that are there are decoded, the partly read last packet is left out
    instead of failing the video, and a warning gives both counts (log and reader)."""
    from videogen import read_index

    cut, full = _truncated_mp4(tmp_path)
    with caplog.at_level("WARNING", logger="i3d.data.decode"), open_video(cut) as reader:
        count = reader.num_frames
        frames = reader.get_frames(range(count))
    assert 10 < count < 40 and reader.claimed_frames == 40
    assert [read_index(f) for f in frames] == list(range(count))
    assert f"cut.mp4 ends early (truncated?): {count} of the 40 frames" in caplog.text
    assert reader.warnings == (
        f"ends early (truncated?): {count} of the 40 frames its header claims could be read; "
        "using those",
    )
    with caplog.at_level("WARNING", logger="i3d.data.decode"):
        caplog.clear()
        with open_video(full) as whole:
            assert whole.warnings == ()
    assert not caplog.text


def test_a_truncated_video_is_flagged_in_every_output(tmp_path):
    """The warning travels from a loader worker (predict --workers 1) into predict's JSON and
    CSV, evaluate's predictions, the pooled features index and the snippet manifest; the
    whole video next to it has none."""
    import csv

    from tinymodel import save_tiny_weights
    from typer.testing import CliRunner

    from i3d.cli.main import app
    from i3d.data.datasets import load_annotations
    from i3d.inference import Predictor
    from i3d.inference.evaluation import evaluate_samples, read_predictions, write_predictions

    cut, full = _truncated_mp4(tmp_path)
    with open_video(cut) as reader:
        (warning,) = reader.warnings
    weights = save_tiny_weights(tmp_path / "w.safetensors", ("a", "b"))
    common = ["--weights", str(weights)]
    videos = [str(cut), str(full)]
    out = tmp_path / "out"
    out.mkdir()

    def run(*args, workers=0):
        result = CliRunner().invoke(app, [*map(str, args), *common, "--workers", str(workers)])
        assert result.exit_code == 0, result.output
        return result

    predicted = run("predict", *videos, "--json", "--csv", out / "p.csv", workers=1)
    records = [json.loads(line) for line in predicted.stdout.splitlines() if line.startswith("{")]
    assert [r.get("warnings") for r in records] == [[warning], None]
    rows = list(csv.DictReader((out / "p.csv").open()))
    assert {r["path"]: r["warnings"] for r in rows} == {str(cut): warning, str(full): ""}
    (tmp_path / "val.txt").write_text(f"{cut.name} 0\n{full.name} 1\n")
    samples = load_annotations(tmp_path / "val.txt", tmp_path)  # what i3d evaluate writes:
    write_predictions(out / "e.jsonl", list(evaluate_samples(samples, Predictor(weights), 0)))
    evaluated = (out / "e.jsonl").read_text().splitlines()
    assert [json.loads(line).get("warnings") for line in evaluated] == [[warning], None]
    assert [s.warnings for s in read_predictions(out / "e.jsonl")] == [(warning,), ()]
    run("features", *videos, "-o", out / "pooled", "--endpoint", "layer4")
    index = json.loads((out / "pooled" / "index.json").read_text())
    assert index["warnings"] == {str(cut): [warning]}
    run("features", *videos, "-o", out / "snippets", "--window", "8")
    manifest = (out / "snippets" / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(line).get("warnings") for line in manifest] == [[warning], None]


def test_a_truncated_video_is_flagged_in_a_sharded_runs_merged_outputs(tmp_path, monkeypatch):
    """Through the ranks' result files (a one-rank torchrun job, in this process), the
    warning reaches predict's JSON and CSV, evaluate's predictions and the pooled features
    index as in one process; before, only the rank logs had it."""
    import csv

    from tinymodel import save_tiny_weights
    from typer.testing import CliRunner

    from i3d.cli.main import app

    cut, full = _truncated_mp4(tmp_path)
    with open_video(cut) as reader:
        (warning,) = reader.warnings
    weights = save_tiny_weights(tmp_path / "w.safetensors", ("a", "b"))
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    out = tmp_path / "out"
    out.mkdir()

    def run(*args):
        argv = [*map(str, args), "--weights", str(weights), "--workers", "0"]
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 0, result.output
        return result

    predicted = run("predict", cut, full, "--json", "--csv", out / "p.csv")
    records = [json.loads(line) for line in predicted.stdout.splitlines() if line.startswith("{")]
    assert [r.get("warnings") for r in records] == [[warning], None]
    rows = list(csv.DictReader((out / "p.csv").open()))
    assert {r["path"]: r["warnings"] for r in rows} == {str(cut): warning, str(full): ""}
    (tmp_path / "val.txt").write_text(f"{cut.name} 0\n{full.name} 1\n")
    run("evaluate", tmp_path / "val.txt", "--data-root", tmp_path, "-o", out / "eval")
    evaluated = (out / "eval" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line).get("warnings") for line in evaluated] == [[warning], None]
    run("features", cut, full, "-o", out / "pooled", "--endpoint", "layer4")
    index = json.loads((out / "pooled" / "index.json").read_text())
    assert index["warnings"] == {str(cut): [warning]}
    assert not list(out.glob("*.parts"))  # merged, then removed


def test_weights_known_only_by_a_hash_prefix_need_trust_prefix(tmp_path, monkeypatch):
    """mmaction2 gives 32 bits of each hash: `weights pull` refuses such an entry in one line
    saying what it risks, before reading the file; --trust-prefix warns and goes on."""
    from typer.testing import CliRunner

    from i3d.cli.main import app

    monkeypatch.setenv("I3D_CACHE", str(tmp_path / "cache"))
    forged = tmp_path / "forged.pth"
    forged.write_bytes(b"not the published file")
    pull = ["weights", "pull", "i3d_r50_k400_rgb", "--from-file", str(forged)]
    refused = CliRunner().invoke(app, pull, env={"COLUMNS": "300"})
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    line = refused.output.strip()
    assert "\n" not in line and "32 bits" in line and "about an hour" in line
    assert line.endswith("pass --trust-prefix to accept it anyway")
    trusted = CliRunner().invoke(app, [*pull, "--trust-prefix"], env={"COLUMNS": "300"})
    assert trusted.exit_code == 1 and "warning:" in trusted.output
    assert "wrong file?" in trusted.output  # checked against the prefix it has


def test_a_rotated_video_is_decoded_upright(tmp_path, monkeypatch):
    """A phone-style file: 48x32 frames stored with a 90° display matrix. Frames (and the
    size the pipelines plan with) come upright, as players show them; I3D_AUTOROTATE=0 gives
    the stored frames, as decord does."""
    import av
    from videogen import pattern_frame

    path = tmp_path / "phone.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv444p"
        stream.set_display_rotation(90)
        stream.options = {"crf": "0"}
        for i in range(6):
            frame = av.VideoFrame.from_ndarray(pattern_frame(i, 48, 32), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with open_video(path) as reader:
        upright, size = reader.get_frames([0, 5]), reader.size
    monkeypatch.setenv("I3D_AUTOROTATE", "0")
    with open_video(path) as reader:
        stored, stored_size = reader.get_frames([0, 5]), reader.size
    assert stored_size == (48, 32) and stored.shape == (2, 32, 48, 3)
    assert size == (32, 48) and upright.shape == (2, 48, 32, 3)
    assert np.array_equal(upright, np.rot90(stored, 1, axes=(1, 2)))
    assert np.abs(stored[1].astype(int) - pattern_frame(5, 48, 32)).max() <= 2
