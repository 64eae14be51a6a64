"""Reading untrusted pickled checkpoints without executing code from them.

Only an allow-list of globals is ever resolved: torch's tensor/storage rebuilders, numpy's
array/dtype/scalar reconstructors and plain containers. Objects from the OpenMMLab packages
that checkpoints carry in ``meta`` (mmengine ``ConfigDict``, ``HistoryBuffer``, ...) become
inert :class:`Ignored` placeholders: their modules are never imported and their code never
runs. Any other global (``os.system``, ``builtins.eval``, ``subprocess.Popen`` ...) aborts
loading with :class:`UnsafePickleError`.
"""

from __future__ import annotations

import _codecs
import builtins
import collections
import contextvars
import copyreg
import io
import os
import pickle
import tarfile
import types
import zipfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from i3d.weights.format import WeightsError


class UnsafePickleError(WeightsError):
    """The pickle asks for a global outside the allow-list: refused, nothing was executed."""


class Ignored(dict):
    """Inert stand-in for a metadata object of a known framework (never executes its code)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def __setstate__(self, state: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass

    def __reduce__(self):  # pragma: no cover - placeholders are never re-pickled
        return (Ignored, ())


def _placeholder(module: str, name: str) -> type:
    return type(name, (Ignored,), {"__module__": f"i3d.ignored.{module}"})


_BUILTINS = {
    "dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "bool",
    "str", "bytes", "bytearray", "slice", "range", "object",
}  # fmt: skip

_TORCH = {
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._utils", "_rebuild_qtensor"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch.nn.parameter", "Parameter"),
    ("torch", "Tensor"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch.serialization", "_get_layout"),
}

_NUMPY = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}

#: packages whose pickled objects are replaced by inert placeholders
IGNORED_PACKAGES = ("mmengine", "mmcv", "mmaction", "mmdet", "mmpretrain", "mmcls", "addict")


def resolve_global(module: str, name: str) -> Any:
    """The object a pickle may use for ``module.name``, or raise :class:`UnsafePickleError`."""
    if module == "builtins" and name in _BUILTINS:
        return getattr(builtins, name)
    if module == "collections" and name in ("OrderedDict", "defaultdict"):
        return getattr(collections, name)
    if module == "copyreg" and name == "_reconstructor":
        return copyreg._reconstructor
    if module == "_codecs" and name == "encode":
        return _codecs.encode
    if (module, name) in _TORCH:
        obj: Any = torch
        for part in (*module.split(".")[1:], name):
            obj = getattr(obj, part)
        return obj
    if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout)):
        return getattr(torch, name)
    if (module, name) in _NUMPY:
        return _numpy_global(module, name)
    if module in ("numpy", "numpy.dtypes") and name.endswith("DType"):
        return getattr(np.dtypes, name)
    if module.split(".")[0] in IGNORED_PACKAGES:
        return _placeholder(module, name)
    raise UnsafePickleError(
        f"refusing to load: the pickle asks for {module}.{name}, which is not a tensor, array "
        "or plain container (a checkpoint never needs it; the file may be malicious)"
    )


def _numpy_global(module: str, name: str) -> Any:
    core = getattr(np, "_core", None) or np.core
    if name in ("_reconstruct", "scalar"):
        return getattr(core.multiarray, name)
    if name == "_frombuffer":  # pickle protocol 5 arrays
        return core.numeric._frombuffer
    return getattr(np, name)


_SHARED_KINDS = (type, types.FunctionType, types.BuiltinFunctionType, types.ModuleType)


class _StorageBudget:
    """Tensor bytes a checkpoint's pickle may claim: no more than its file holds. torch
    allocates each storage at the size the pickle names before reading its bytes, so a
    36-byte pickle could otherwise commit gigabytes."""

    def __init__(self, limit: int) -> None:
        self.limit, self.claimed = limit, 0
        self.seen: set[object] = set()

    def claim(self, saved_id: object) -> None:
        """Count a persistent id's storage (zip and legacy: ('storage', type, key, loc,
        numel, ...)) once per key; refuse a claim past the limit before torch allocates it."""
        if not (isinstance(saved_id, tuple) and len(saved_id) >= 5):
            return
        if saved_id[0] not in ("storage", b"storage"):
            return
        storage_type, key, numel = saved_id[1], saved_id[2], saved_id[4]
        if not isinstance(numel, int) or numel < 0:
            raise UnsafePickleError(f"refusing to load: a storage claims {numel!r} elements")
        if not isinstance(key, (str, bytes, int)):
            raise UnsafePickleError(f"refusing to load: a storage key is a {type(key).__name__}")
        if key in self.seen:
            return
        self.seen.add(key)
        dtype = getattr(storage_type, "dtype", torch.uint8)
        self.claimed += numel * (dtype.itemsize if isinstance(dtype, torch.dtype) else 1)
        if self.claimed > self.limit:
            raise UnsafePickleError(
                f"refusing to load: its tensors claim at least {self.claimed:,} bytes, more "
                f"than the {self.limit:,}-byte file holds (truncated or forged)"
            )


_BUDGET: contextvars.ContextVar[_StorageBudget | None] = contextvars.ContextVar(
    "i3d_storage_budget", default=None
)


class RestrictedUnpickler(pickle._Unpickler):
    """An unpickler whose ``find_class`` goes through :func:`resolve_global` and whose BUILD
    never touches an object shared with the rest of the process.

    BUILD sets attributes (``__setstate__``, or ``setattr`` of its state) on the object below
    it; on an allow-listed global (a torch rebuild function, ``torch.Tensor``) that would
    patch it for every later load in the process. The pure-Python unpickler is used because
    its opcode table can be given a checked BUILD (a copy: the module's table is untouched).
    """

    dispatch: ClassVar[dict[int, Any]] = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: Any, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._shared: set[int] = set()  # ids of the globals this load resolved

    def find_class(self, module: str, name: str) -> Any:
        obj = resolve_global(module, name)
        self._shared.add(id(obj))
        return obj

    def load_build(self) -> None:
        target = self.stack[-2]  # BUILD pops its state, then updates the object below it
        if id(target) in self._shared or isinstance(target, _SHARED_KINDS):
            name = getattr(target, "__name__", type(target).__name__)
            raise UnsafePickleError(
                f"refusing to load: the pickle sets attributes on {name!r}, a function or "
                "class shared with the rest of the program (the file may be malicious)"
            )
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build

    @property
    def persistent_load(self) -> Any:
        """torch sets its storage loader here; it runs behind the claimed-size check."""
        return self.__dict__.get("_persistent_load", self._no_persistent_ids)

    @persistent_load.setter
    def persistent_load(self, load: Any) -> None:
        budget = _BUDGET.get()

        def checked(saved_id: Any) -> Any:
            if budget is not None:
                budget.claim(saved_id)
            return load(saved_id)

        self.__dict__["_persistent_load"] = checked

    @staticmethod
    def _no_persistent_ids(saved_id: Any) -> Any:
        raise pickle.UnpicklingError("unsupported persistent id in a plain pickle")


# torch.load accepts any module exposing Unpickler/load; this one is restricted.
restricted_pickle = types.ModuleType("i3d_restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = lambda f, **kw: RestrictedUnpickler(f, **kw).load()
restricted_pickle.__name__ = "pickle"


def load_plain_pickle(path: str | os.PathLike[str]) -> Any:
    """A plain pickle (not a torch checkpoint), e.g. Caffe2's Python 2 ``.pkl`` weights, with
    the restricted unpickler; Python 2 strings are read as latin-1, as numpy needs for the
    array bytes in them. Arrays take their bytes from the file, so no more than it holds."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise WeightsError(f"checkpoint {path} is empty (0 bytes)")
    try:
        with open(path, "rb") as fh:
            return RestrictedUnpickler(fh, encoding="latin1").load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{path}: {exc}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError, AttributeError,
            IndexError, OSError, MemoryError) as exc:  # fmt: skip
        raise WeightsError(
            f"{path} is not a readable pickle (truncated or corrupt?): {type(exc).__name__}: {exc}"
        ) from exc


def load_checkpoint(path: str | os.PathLike[str]) -> Any:
    """Load a torch checkpoint (zip or legacy format) with the restricted unpickler."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise WeightsError(f"checkpoint {path} is empty (0 bytes)")
    _check_tar_members(path)
    _check_zip_members(path)
    token = _BUDGET.set(_StorageBudget(path.stat().st_size))
    try:
        return torch.load(
            path, map_location="cpu", weights_only=False, pickle_module=restricted_pickle
        )
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{path}: {exc}") from None
    except (pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile, ValueError,
            KeyError, TypeError, AttributeError, IndexError, OSError) as exc:  # fmt: skip
        raise WeightsError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    finally:
        _BUDGET.reset(token)


def _check_zip_members(path: Path) -> None:
    """torch writes its zip checkpoints uncompressed, so no member of a real one is larger
    than the file: refuse one that is (a compressed member would inflate into memory)."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, EOFError):
        return  # torch.load reports what is wrong with it
    size = path.stat().st_size
    for member in members:
        if member.file_size > size:
            raise WeightsError(
                f"{path}: archive member {member.filename!r} unpacks to {member.file_size:,} "
                f"bytes, more than the {size:,}-byte file holds; refusing to load it"
            )


def _check_tar_members(path: Path) -> None:
    """torch's oldest checkpoint format is a tar that ``torch.load`` extracts to a temporary
    folder: refuse one with a member that is not a regular file (a FIFO would block the
    load forever, a link would point elsewhere) or that claims more bytes than the file has."""
    try:
        if not tarfile.is_tarfile(path):
            return
        with tarfile.open(path) as tar:
            members = tar.getmembers()
    except (tarfile.TarError, OSError, EOFError):
        return  # not a tar after all: torch.load reports what it is
    size = path.stat().st_size
    for member in members:
        if not member.isfile():
            raise WeightsError(
                f"{path}: archive member {member.name!r} is not a regular file (a FIFO, link or "
                "device); refusing to load it"
            )
        if member.size > size:
            raise WeightsError(
                f"{path}: archive member {member.name!r} claims {member.size:,} bytes, more than "
                f"the {size:,}-byte file holds"
            )


def loads_restricted(data: bytes) -> Any:
    """Unpickle plain bytes (e.g. a numpy-only pickle) with the restricted allow-list."""
    try:
        return RestrictedUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError) as exc:  # fmt: skip
        raise WeightsError(f"not a readable pickle (truncated or corrupt?): {exc}") from exc
