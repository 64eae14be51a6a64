"""The project's weight format: ``.safetensors`` whose metadata rebuilds and describes the model.

Metadata keys (all JSON strings): ``i3d.format`` (version), ``i3d.config`` (model config),
``i3d.labels`` (class names or null), ``i3d.preprocessing``, ``i3d.provenance``.
Reading never executes code: safetensors holds raw tensors and JSON only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from i3d.models import build_model, config_from_dict, config_to_dict
from i3d.models.config import ConfigError
from i3d.utils.files import atomic_path
from i3d.utils.untrusted import load_json
from i3d.weights.preprocessing import Preprocessing

FORMAT_VERSION = "1"


class WeightsError(ValueError):
    """A weight file or checkpoint is unreadable, malformed or does not fit its model."""


@attrs.frozen
class Provenance:
    """Where the weights came from: source file, its hash, and the converter that read it."""

    source_name: str | None = None
    source_sha256: str | None = None
    source_format: str | None = None
    converter: str = "i3d"
    converter_version: str = attrs.field(factory=lambda: _package_version())
    notes: str | None = None


def _package_version() -> str:
    from i3d import __version__

    return __version__


def _labels(value: Any) -> tuple[str, ...] | None:
    """Class names as a tuple of strings; one string, a mapping or a number is refused."""
    if value is None:
        return None
    if isinstance(value, str | bytes | Mapping):
        raise WeightsError(f"labels must be a list of class names, got {type(value).__name__}")
    try:
        return tuple(str(s) for s in value)
    except TypeError:
        raise WeightsError(
            f"labels must be a list of class names, got {type(value).__name__}"
        ) from None


@attrs.frozen
class WeightsInfo:
    """Everything a weight file says besides its tensors."""

    config: Any
    labels: tuple[str, ...] | None = attrs.field(default=None, converter=_labels)
    preprocessing: Preprocessing = attrs.field(factory=Preprocessing)
    provenance: Provenance = attrs.field(factory=Provenance)

    def __attrs_post_init__(self) -> None:
        num_classes = getattr(getattr(self.config, "head", None), "num_classes", None)
        if self.labels is not None and num_classes is not None and len(self.labels) != num_classes:
            raise WeightsError(
                f"{len(self.labels)} labels given but the model has {num_classes} classes"
            )

    def to_metadata(self) -> dict[str, str]:
        return {
            "i3d.format": FORMAT_VERSION,
            "i3d.config": json.dumps(config_to_dict(self.config)),
            "i3d.labels": json.dumps(list(self.labels) if self.labels is not None else None),
            "i3d.preprocessing": json.dumps(self.preprocessing.to_dict()),
            "i3d.provenance": json.dumps(attrs.asdict(self.provenance)),
        }

    @classmethod
    def from_metadata_if_any(
        cls, meta: dict[str, str] | None, path: str | os.PathLike[str]
    ) -> WeightsInfo | None:
        """Like :meth:`from_metadata`, but None when ``meta`` carries no i3d config at all."""
        return cls.from_metadata(meta, path) if meta and "i3d.config" in meta else None

    @classmethod
    def from_metadata(
        cls, meta: dict[str, str] | None, path: str | os.PathLike[str]
    ) -> WeightsInfo:
        if not meta or "i3d.config" not in meta:
            raise WeightsError(
                f"{path} is a safetensors file without i3d metadata; convert the original "
                "checkpoint with `i3d convert-weights` instead"
            )
        if meta.get("i3d.format") != FORMAT_VERSION:
            raise WeightsError(
                f"{path} has i3d weight format {meta.get('i3d.format')!r}; this version of i3d "
                f"reads format {FORMAT_VERSION}"
            )
        try:
            config = config_from_dict(load_json(meta["i3d.config"], "i3d.config"))
            labels = load_json(meta.get("i3d.labels", "null"), "i3d.labels")
            prep = Preprocessing.from_dict(_json_object(meta, "i3d.preprocessing"))
            prov = Provenance(**_json_object(meta, "i3d.provenance"))
            return cls(config=config, labels=labels, preprocessing=prep, provenance=prov)
        except (json.JSONDecodeError, ConfigError, TypeError, ValueError) as exc:
            raise WeightsError(f"{path}: corrupt i3d metadata: {exc}") from exc


def _json_object(meta: dict[str, str], key: str) -> dict[str, Any]:
    """The JSON object stored under ``key`` (``{}`` when absent); anything else is refused."""
    value = load_json(meta.get(key, "{}"), key)
    if not isinstance(value, dict):
        raise WeightsError(f"{key} must be a JSON object, got {type(value).__name__}")
    return value


def save_weights(
    path: str | os.PathLike[str], state_dict: dict[str, torch.Tensor], info: WeightsInfo
) -> Path:
    """Write ``state_dict`` + ``info`` to ``path`` atomically (temp file, then rename)."""
    tensors = _independent_tensors(state_dict)
    check_state_dict(info.config, tensors)
    path = Path(path)
    meta = {**info.to_metadata(), DIGEST_KEY: tensor_digest(tensors.items())}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


DIGEST_KEY = "i3d.tensors_sha256"
"""Metadata key of the SHA-256 of a weight file's tensors (names, dtypes, shapes, bytes)."""


def tensor_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over every (name, tensor) in name order: name, dtype, shape and raw bytes, so
    any change to the tensor data (or which tensor is which) changes it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        header = json.dumps([name, str(flat.dtype), list(tensor.shape)])
        digest.update(header.encode())
        digest.update(flat.view(torch.uint8).numpy().data if flat.numel() else b"")
    return digest.hexdigest()


def verify_tensors(path: str | os.PathLike[str]) -> None:
    """Check a weight file's tensors against the digest recorded when it was saved (one
    tensor in memory at a time); files written before digests were recorded pass."""
    with _open(path) as fh:
        expected = (fh.metadata() or {}).get(DIGEST_KEY)
        if expected is None:
            return
        actual = tensor_digest((k, fh.get_tensor(k)) for k in fh.keys())  # noqa: SIM118
    _check_digest(path, expected, actual)


def _check_digest(path: str | os.PathLike[str], expected: str, actual: str) -> None:
    if actual != expected:
        raise WeightsError(
            f"{path}: its tensor data does not match the digest recorded when it was saved; "
            "the file was modified or damaged (re-convert it, or pull it again with --force)"
        )


def _independent_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors that share no storage (safetensors' rule), copying only if needed."""
    if not isinstance(state_dict, Mapping):
        raise WeightsError(
            f"expected a state dict (model.state_dict()), got {type(state_dict).__name__}"
        )
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise WeightsError(
                f"state dict entry {key!r} is a {type(value).__name__}, not a tensor"
            )
        tensor = value.detach().to("cpu").contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen and tensor.numel() > 0:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def _meta_model(config: Any) -> torch.nn.Module:
    """The model of ``config`` on the meta device: its structure without memory or init cost."""
    try:
        with torch.device("meta"):
            return build_model(config)
    except (RuntimeError, ValueError, OverflowError) as exc:  # e.g. absurd widths or class counts
        raise WeightsError(f"the model config cannot be built: {exc}") from exc


def check_state_dict(config: Any, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise :class:`WeightsError` naming every missing, unexpected or mis-shaped key."""
    _check_fit(_meta_model(config).state_dict(), state_dict)


def _check_fit(expected: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor]) -> None:
    """:func:`check_state_dict` against the state dict of an already built model."""
    missing = [k for k in expected if k not in state_dict]
    extra = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    kinds = [
        f"{k}: file {state_dict[k].dtype} vs model {v.dtype}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].is_floating_point() != v.is_floating_point()
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_preview(missing)}")
    if extra:
        problems.append(f"unexpected keys ({len(extra)}): {_preview(extra)}")
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {_preview(shapes)}")
    if kinds:
        problems.append(f"dtype mismatches ({len(kinds)}): {_preview(kinds)}")
    if problems:
        raise WeightsError("weights do not fit the model config; " + "; ".join(problems))


def _preview(items: list[str], limit: int = 8) -> str:
    head = ", ".join(items[:limit])
    return head + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def parameter_count(config: Any) -> int:
    """Parameters of the model ``config`` describes, counted without allocating its weights."""
    return sum(p.numel() for p in _meta_model(config).parameters())


def read_info(path: str | os.PathLike[str]) -> WeightsInfo:
    """Metadata of a weight file, without reading its tensors."""
    with _open(path) as fh:
        return WeightsInfo.from_metadata(fh.metadata(), path)


def load_weights(
    path: str | os.PathLike[str], verify: bool = True
) -> tuple[dict[str, torch.Tensor], WeightsInfo]:
    """Tensors and metadata of a weight file (tensors on CPU). ``verify`` checks the tensors
    against the digest the file records (about 0.1 s per 100 MB; ``False`` skips it)."""
    with _open(path) as fh:
        meta = fh.metadata() or {}
        info = WeightsInfo.from_metadata(meta, path)
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open API)
    if verify and DIGEST_KEY in meta:
        _check_digest(path, meta[DIGEST_KEY], tensor_digest(tensors.items()))
    return tensors, info


def _open(path: str | os.PathLike[str]):
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"{path} is a folder; give a .safetensors weight file")
    if not path.is_file():
        raise WeightsError(f"weight file {path} does not exist")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(
            f"{path} is not a readable .safetensors file ({exc}); convert checkpoints "
            "with `i3d convert-weights`"
        ) from exc


def _usable_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device, after checking this process can see it."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise WeightsError(
            f"invalid device {device!r}; use 'cpu', 'cuda:N' (or 'npu:N' once torch_npu is "
            "imported)"
        ) from None
    module = getattr(torch, device.type, None) if device.type not in ("cpu", "meta") else None
    if module is not None and hasattr(module, "is_available"):
        if not module.is_available():
            raise WeightsError(f"device {device} is not available to this process; use 'cpu'")
        count = module.device_count()
        if device.index is not None and device.index >= count:
            raise WeightsError(f"device {device} does not exist: {count} {device.type} visible")
    return device


def load_model(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    verify: bool = True,
) -> torch.nn.Module:
    """Rebuild the model stored in a weight file, in eval mode on ``device``.

    Stored tensors take the model's own dtypes (float32 unless ``dtype`` says otherwise), so
    a file saved in half precision loads like any other; NaN or infinite values are refused.
    The returned model has ``.weights_info`` (labels, preprocessing, provenance). ``verify``
    checks the tensors against the digest recorded at save time (see :func:`load_weights`).
    """
    device = _usable_device(device)
    tensors, info = load_weights(path, verify)
    model = _meta_model(info.config)
    expected = model.state_dict()
    _check_fit(expected, tensors)
    tensors = {k: v.to(expected[k].dtype) for k, v in tensors.items()}
    broken = [k for k, v in tensors.items() if v.is_floating_point() and not v.isfinite().all()]
    if broken:
        raise WeightsError(
            f"{path}: NaN or infinite values in {len(broken)} tensors: {_preview(broken)}; "
            "the weights are damaged (e.g. a diverged training run)"
        )
    model.load_state_dict(tensors, strict=True, assign=True)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise WeightsError(f"{path}: model tensors not filled by the file: {_preview(left)}")
    model.weights_info = info
    model.eval()
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
