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


def test_a_gif_claiming_a_huge_canvas_is_refused(tmp_path):
    path = tmp_path / "big.gif"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    data[6:10] = struct.pack("<HH", 16000, 16000)  # logical screen: 256 megapixels
    path.write_bytes(bytes(data))
    with pytest.raises(VideoDecodeError, match="16000x16000"):
        open_video(path)


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


def test_deeply_nested_metadata_is_a_one_line_error(tmp_path):
    """JSON nested 100k deep in a weights file's labels: no RecursionError traceback."""
    from safetensors.torch import load_file, save_file
    from tinymodel import save_tiny_weights
    from typer.testing import CliRunner

    from i3d.cli.main import app
    from i3d.utils.untrusted import load_json

    weights = save_tiny_weights(tmp_path / "w.safetensors", ("a", "b"))
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as fh:
        meta = dict(fh.metadata())
    meta["i3d.labels"] = "[" * 100_000 + "]" * 100_000
    save_file(load_file(str(weights)), str(tmp_path / "deep.safetensors"), metadata=meta)
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "deep.safetensors")])
    assert result.exit_code == 1 and "nested too deeply" in result.output
    assert "Traceback" not in result.output
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


def test_a_tiny_checkpoint_claiming_gigabytes_is_refused_before_allocation(tmp_path, monkeypatch):
    """torch allocates each storage at the size the pickle names before reading its bytes:
    a few hundred bytes claiming 3 GiB (legacy and zip formats) are refused first."""
    import io
    import pickle
    import zipfile

    import torch
    from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

    from i3d.weights.safe_pickle import UnsafePickleError, load_checkpoint

    legacy = io.BytesIO()
    sys_info = {"protocol_version": PROTOCOL_VERSION, "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 4}}  # fmt: skip
    for header in (MAGIC_NUMBER, PROTOCOL_VERSION, sys_info):
        pickle.dump(header, legacy, protocol=2)
    legacy.write(_claiming_pickle(3 * 2**28, view_metadata=None))
    (tmp_path / "legacy.pth").write_bytes(legacy.getvalue())
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


def _with_file_limit(limit: int, tmpdir, job) -> tuple[int, str]:
    """Run ``job`` in a forked child whose files cannot grow past ``limit`` bytes and whose
    TMPDIR is ``tmpdir``: (exit status, what it printed). RLIMIT_FSIZE makes the kernel fail
    the write with EFBIG (Python ignores SIGXFSZ), the way a full disk fails it with ENOSPC."""
    import resource
    import sys
    import tempfile
    import traceback

    import torch

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 70
        try:
            os.close(read)
            os.dup2(write, 1)
            os.dup2(write, 2)
            sys.stdout = sys.stderr = open(write, "w", buffering=1, closefd=False)  # noqa: SIM115
            os.environ["TMPDIR"] = str(tmpdir)
            tempfile.tempdir = None
            torch.set_num_threads(1)  # as a DataLoader worker: no thread pool after fork
            hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
            job()
            status = 0
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            status = 71
        finally:
            sys.stdout.flush()
            os._exit(status)
    os.close(write)
    with open(read, "rb") as fh:
        printed = fh.read().decode(errors="replace")
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), printed


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
    status, printed = _with_file_limit(
        limit, tmpdir, lambda: app([*args, *videos], prog_name="i3d")
    )
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

    status, printed = _with_file_limit(4096, tmp_path, job)
    assert status == 0, printed
    lines = printed.splitlines()
    assert len(lines) == len(writers), printed
    for line, name in zip(lines, writers, strict=True):
        kept = "the previous" if (tmp_path / name).exists() else "nothing was written"
        assert line.startswith(f"{name}: cannot write {tmp_path / name}: file too large; {kept}")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert _leftovers(tmp_path) == []


def test_a_truncated_video_is_read_as_far_as_it_goes_with_a_warning(tmp_path, caplog):
    """An mp4 cut at 60% (its index, written first, still claims 40 frames): the frames that
    are there are decoded, the partly read last packet is left out instead of failing the
    video, and a warning gives both counts; predict then runs on what is there."""
    import av
    from tinymodel import save_tiny_weights
    from typer.testing import CliRunner
    from videogen import pattern_frame, read_index

    from i3d.cli.main import app

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
    with caplog.at_level("WARNING", logger="i3d.data.decode"), open_video(cut) as reader:
        count = reader.num_frames
        frames = reader.get_frames(range(count))
    assert 10 < count < 40 and reader.claimed_frames == 40
    assert [read_index(f) for f in frames] == list(range(count))
    assert f"cut.mp4 ends early (truncated?): {count} of the 40 frames" in caplog.text
    caplog.clear()
    weights = save_tiny_weights(tmp_path / "w.safetensors", ("a", "b"))
    with caplog.at_level("WARNING", logger="i3d.data.decode"):
        result = CliRunner().invoke(app, ["predict", str(cut), "--weights", str(weights)])
    assert result.exit_code == 0, result.output
    assert f"{count} of the 40 frames" in caplog.text
    with caplog.at_level("WARNING", logger="i3d.data.decode"):
        caplog.clear()
        open_video(full).close()
    assert not caplog.text


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
