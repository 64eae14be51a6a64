"""OpenVINO on the CPU: models converted once per clip shape, cached on disk, run as async requests.

The torch model is converted with ``openvino.convert_model`` (from a TorchScript trace, or
``torch.export`` where tracing cannot convert; exact to ~1e-6), checked against torch on natural
frames, and saved as OpenVINO IR. The compiled model of each precision and mode is saved
beside it, so a second run imports it in seconds. Each clip is one infer request; a batch of
clips (e.g. a video's 30 views) runs as concurrent requests. A runner made by
:func:`endpoint_runner` converts the model truncated at a feature endpoint instead (its own
cache entries), for ``i3d features``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.metadata
import io
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from i3d.backends.base import (
    Availability,
    BackendError,
    BackendUnavailable,
    ClipRunner,
    check_options,
    check_precision,
    first_line,
    labels_of,
    preprocessing_of,
    resolve_model,
    thread_count,
)
from i3d.backends.check_input import natural_clips
from i3d.backends.float32 import float32_mode
from i3d.backends.torch_backend import parse_flag
from i3d.models.space_to_depth import space_to_depth_stem
from i3d.utils.files import OutputError, atomic_path, no_room_as_output_error

INSTALL_HINT = 'pip install "i3d[openvino]" (or: pip install openvino)'
INT8_HINT = 'pip install "i3d[openvino-int8]" (or: pip install nncf)'
CLIPS_PER_VIDEO = 3  # calibration views taken from each listed video
MAX_CALIBRATION_CLIPS = 64
DEFAULT_CHUNK = 30  # clips handed to the request queue at once: a 30-view video
CHECK_RTOL = 1e-4  # max|openvino - torch| / max|torch| allowed for a converted model
CACHE_FORMAT = "1"  # part of every cache key; change it when the conversion changes
OPENVINO_OPTIONS = {
    "mode": "auto (default: latency for one clip, throughput for several), latency or "
    "throughput: OpenVINO's PERFORMANCE_HINT",
    "threads": "int, OpenVINO inference threads (INFERENCE_NUM_THREADS)",
    "cache": "bool, keep converted and compiled models in the i3d cache (default: true for "
    "weight files, false for in-memory models)",
    "calibration": "int8: a text file naming your videos, one per line; their first clips "
    "(the weights' test pipeline) calibrate NNCF's post-training quantisation",
}
#: precision -> (OpenVINO element type name, the CPU capability it needs)
#: (int8 is a quantised model; its other operations run in f32)
OV_PRECISIONS = {
    "fp32": ("f32", "FP32"),
    "bf16": ("bf16", "BF16"),
    "fp16": ("f16", "FP16"),
    "int8": ("f32", "INT8"),
}
MODES = {"latency": "LATENCY", "throughput": "THROUGHPUT"}


#: what to do when the cache has no room
CACHE_HINT = "Free space there, set I3D_CACHE to a folder with room, or pass the option cache=false"


def import_openvino() -> ModuleType:
    """The ``openvino`` module, or :class:`BackendUnavailable` saying how to install it."""
    try:
        import openvino
    except ImportError as exc:
        raise BackendUnavailable(f"{missing_reason(exc)}; {INSTALL_HINT}") from exc
    return openvino


@functools.cache
def shared_core() -> Any:
    """The process's one ``openvino.Core``, alive until exit.

    OpenVINO's CPU plugin installs an alternate signal stack on the thread that creates it
    and, when its Core is destroyed, restores the stack it found. With two Cores destroyed
    out of order the thread keeps a freed stack, and the next signal it handles (a loader
    worker's SIGCHLD) kills the process with SIGSEGV; one Core for every runner avoids that.
    """
    return import_openvino().Core()


def missing_reason(exc: ImportError) -> str:
    """Why ``import openvino`` failed, in a few words: absent, or installed but broken."""
    if isinstance(exc, ModuleNotFoundError) or "None in sys.modules" in str(exc):
        return "openvino is not installed"
    return f"openvino is installed but cannot be imported ({exc})"


def cache_root() -> Path:
    """Where converted models live: ``openvino/`` in the i3d cache (``$I3D_CACHE`` overrides)."""
    from i3d.weights.hub import cache_dir

    return cache_dir() / "openvino"


def model_digest(model: nn.Module) -> str:
    """SHA-256 of a model's class, config and tensors: equal digests convert identically."""
    from i3d.models import config_to_dict
    from i3d.weights.format import tensor_digest

    config = getattr(model, "config", None)
    described = {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": config_to_dict(config) if config is not None else None,
        "tensors": tensor_digest(model.state_dict().items()),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def ir_key(digest: str, clip: tuple[int, ...], version: str, endpoint: str | None = None) -> str:
    """Cache key of a converted model: weights digest, clip shape (C, T, H, W), versions, and
    the feature endpoint it stops at (None: the whole classifier)."""
    parts: list[object] = [CACHE_FORMAT, digest, list(clip), version]
    if endpoint is not None:  # classifier keys stay as they were: existing caches are valid
        parts.append(endpoint)
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def cpu_capabilities(core: Any) -> tuple[str, ...]:
    """What OpenVINO's CPU plugin can compute here (FP32, BF16, FP16, INT8, ...)."""
    return tuple(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def compile_config(precision: str, mode: str, threads: int | None) -> dict[str, str]:
    """CPU plugin properties; the precision is always explicit (bf16 CPUs default to bf16)."""
    config = {
        "INFERENCE_PRECISION_HINT": OV_PRECISIONS[precision][0],
        "PERFORMANCE_HINT": MODES[mode],
    }
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    return config


def amx_units() -> bool:
    """Whether this CPU has AMX tile units (torch's run-time check; False where it has none)."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check()) if check is not None else False


def rewrites_stem(precision: str) -> bool:
    """Whether the model is converted with its stem as space-to-depth: bf16 and int8 on AMX,
    whose 32-deep tiles a 3-channel stem leaves mostly empty (i3d.models.space_to_depth).
    fp32, and CPUs without AMX (not measured), keep the plain stem."""
    return precision in ("bf16", "int8") and amx_units()


CHECK_CONFIG = compile_config("fp32", "latency", None)  # what conversions are checked with


class EndpointModel(nn.Module):
    """A recognizer truncated at one endpoint: ``forward(x)`` is that endpoint's map."""

    def __init__(self, model: nn.Module, endpoint: str) -> None:
        super().__init__()
        self.model = model
        self.endpoint = endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.endpoints(x, [self.endpoint])[self.endpoint]


class OpenVinoRunner(ClipRunner):
    """Clips through OpenVINO's CPU plugin; one compiled model per clip shape and mode, built
    on demand. ``mode="auto"`` runs a single clip in latency mode and several in throughput
    mode (streams working on concurrent requests). With ``endpoint``, the model converted is
    the recognizer truncated there (:meth:`maps` runs it; cached under keys of its own)."""

    backend = "openvino"
    device = "cpu"

    def __init__(
        self,
        model: nn.Module,
        precision: str,
        batch_size: int | None,
        mode: str,
        threads: int | None,
        cache: Path | None,
        calibration: tuple[Path, ...] = (),
        endpoint: str | None = None,
    ) -> None:
        super().__init__(batch_size or DEFAULT_CHUNK, preprocessing_of(model))
        self.ov = import_openvino()
        self.core = shared_core()
        self.version = self.ov.get_version()
        self.labels = labels_of(model)
        self.precision = precision
        self.mode = mode
        self.threads = threads
        if rewrites_stem(precision):
            model = space_to_depth_stem(model)
        self.digest = model_digest(model)  # the rewritten model's: cached apart from fp32's
        self.endpoint = endpoint
        self.model = model if endpoint is None else EndpointModel(model, endpoint).eval()
        self.check_prep = preprocessing_of(model)
        self.cache = cache
        self.calibration = calibration
        #: int8: per clip shape, (top-1 agreement, max relative logit change) against fp32 on
        #: the calibration clips, measured when the model was quantised
        self.int8_cost: dict[tuple[int, ...], tuple[float, float]] = {}
        #: models converted or read this session, by clip shape (and (shape, "int8"))
        self.irs: dict[Any, Any] = {}
        self.queues: dict[tuple[tuple[int, ...], str], Any] = {}
        #: per clip shape, the fp32 model the conversion check compiled (reused once)
        self.checked: dict[tuple[int, ...], Any] = {}
        #: where each (clip shape, mode)'s compiled model came from: converted, ir cache,
        #: compiled cache
        self.sources: dict[tuple[tuple[int, ...], str], str] = {}

    def _queue_for(self, clip: tuple[int, ...], count: int) -> Any:
        mode = self.mode if self.mode != "auto" else "throughput" if count > 1 else "latency"
        if (clip, mode) not in self.queues:
            config = compile_config(self.precision, mode, self.threads)
            try:
                compiled = self._compiled(clip, mode, config)
            except OutputError:  # no room: it names the file and says what to do
                raise
            except OSError as exc:  # the cache folder: unwritable, a file in the way, disk full
                raise BackendError(
                    f"cannot use the openvino cache {self.cache}: {exc.strerror or exc}; set "
                    "I3D_CACHE to a writable folder or pass the option cache=false"
                ) from exc
            got = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
            if got != config["INFERENCE_PRECISION_HINT"]:
                raise BackendError(
                    f"OpenVINO compiled the model for {got}, not the {self.precision} asked "
                    "for (the CPU cannot run it); use --precision fp32"
                )
            jobs = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
            self.queues[clip, mode] = self.ov.AsyncInferQueue(compiled, max(jobs, 1))
        return self.queues[clip, mode]

    def _compiled(self, clip: tuple[int, ...], mode: str, config: dict[str, str]) -> Any:
        """The compiled model: imported from the cache, or compiled from (cached) IR."""
        if self.cache is None:
            if self.precision == "int8":
                ir, self.sources[clip, mode] = self._int8_ir(clip, None)
            else:
                ir, self.sources[clip, mode] = self._ir(clip, None)
            return self._compile(clip, ir, config)
        key = ir_key(self.digest, clip, self.version, self.endpoint)
        self.cache.mkdir(parents=True, exist_ok=True)
        cpu = self.core.get_property("CPU", "FULL_DEVICE_NAME")
        calibrated = calibration_digest(self.calibration) if self.precision == "int8" else ""
        text = json.dumps([config, cpu, calibrated])
        settings = hashlib.sha256(text.encode()).hexdigest()[:12]
        blob = self.cache / f"{key}-{self.precision}-{mode}-{settings}.blob"
        if blob.is_file():
            with contextlib.suppress(RuntimeError):  # damaged, or from another CPU: rebuild
                compiled = self.core.import_model(blob.read_bytes(), "CPU", config)
                self.sources[clip, mode] = "compiled cache"
                return compiled
        if self.precision == "int8":
            ir, self.sources[clip, mode] = self._int8_ir(clip, key)
        else:
            ir, self.sources[clip, mode] = self._ir(clip, self.cache / f"{key}.xml")
        compiled = self._compile(clip, ir, config)
        stream = io.BytesIO()
        compiled.export_model(stream)
        with atomic_path(blob, CACHE_HINT) as tmp:
            tmp.write_bytes(stream.getvalue())
        return compiled

    def _compile(self, clip: tuple[int, ...], ir: Any, config: dict[str, str]) -> Any:
        """``ir`` compiled with ``config``: the model the conversion check compiled, when it
        was compiled so (fp32, latency mode, default threads), else compiled now (and the
        check's model dropped)."""
        checked = self.checked.pop(clip, None)
        if checked is not None and config == CHECK_CONFIG and self.precision == "fp32":
            return checked
        return self.core.compile_model(ir, "CPU", config)

    def _ir(self, clip: tuple[int, ...], xml: Path | None) -> tuple[Any, str]:
        """The model for ``clip`` and where it came from: this session or ``xml`` ("ir
        cache"), or "converted" now (and saved as ``xml``)."""
        if clip in self.irs:
            return self.irs[clip], "ir cache"
        if xml is not None and xml.is_file():
            with contextlib.suppress(RuntimeError):  # unreadable: convert again
                self.irs[clip] = self.core.read_model(str(xml))
                return self.irs[clip], "ir cache"
        self.irs[clip] = self._convert(clip)
        if xml is not None:
            save_ir(self.ov, self.irs[clip], xml)
        return self.irs[clip], "converted"

    def source_model(self, clip: tuple[int, ...]) -> Any:
        """The OpenVINO model (not compiled) this runner runs for clips of shape ``clip``
        (C, T, H, W) at its precision, the quantised one for int8: to inspect or profile."""
        key = ir_key(self.digest, clip, self.version, self.endpoint)
        if self.precision == "int8":
            return self._int8_ir(clip, key if self.cache is not None else None)[0]
        return self._ir(clip, self.cache / f"{key}.xml" if self.cache is not None else None)[0]

    def _int8_ir(self, clip: tuple[int, ...], key: str | None) -> tuple[Any, str]:
        """The quantised model for ``clip``: cached (keyed also by the calibration videos),
        or quantised now from the fp32 one with NNCF, its accuracy cost measured."""
        if (clip, "int8") in self.irs:  # quantised already for another mode
            return self.irs[clip, "int8"], "ir cache"
        xml = None
        if key is not None and self.cache is not None:
            xml = self.cache / f"{key}-int8-{calibration_digest(self.calibration)[:16]}.xml"
            if xml.is_file():
                with contextlib.suppress(RuntimeError):  # unreadable: quantise again
                    return self.core.read_model(str(xml)), "ir cache"
        fp32, _ = self._ir(clip, self.cache / f"{key}.xml" if xml is not None else None)
        clips = calibration_clips(self.calibration, self.preprocessing, clip)
        import nncf

        print(f"openvino: quantising to int8 on {len(clips)} calibration clips", file=sys.stderr)
        data = [c[None].numpy() for c in clips]
        with contextlib.redirect_stdout(sys.stderr):  # its progress bar, off the results
            quantised = nncf.quantize(fp32, nncf.Dataset(data), subset_size=len(data))
        self.int8_cost[clip] = int8_cost(self.core, fp32, quantised, data)
        agree, rel = self.int8_cost[clip]
        print(
            f"openvino: int8 against fp32 on the calibration clips: top-1 agrees on "
            f"{agree:.0%}, logits change by up to {rel:.2%} of their largest magnitude",
            file=sys.stderr,
        )
        if xml is not None:
            save_ir(self.ov, quantised, xml)
        self.irs[clip, "int8"] = quantised
        return quantised, "converted"

    def _convert(self, clip: tuple[int, ...]) -> Any:
        """Convert the torch model for (1, *clip) input and check it against torch (fp32)."""
        shape = (1, *clip)
        where = f"; cached in {self.cache}" if self.cache is not None else ""
        upto = f" up to endpoint {self.endpoint}" if self.endpoint is not None else ""
        outputs = "logits" if self.endpoint is None else f"{self.endpoint} maps"
        print(
            f"openvino: converting the model{upto} for clips {'×'.join(map(str, clip))} "
            f"(first use only{where})",
            file=sys.stderr,
        )
        check = natural_clips(shape, self.check_prep)
        try:
            with torch.no_grad(), float32_mode("cpu"):
                expected = self.model(check).float().numpy()
        except (RuntimeError, ValueError) as exc:  # clips too short or small for the strides
            raise BackendError(f"the model failed on clips {shape}: {first_line(exc)}") from exc
        if not np.isfinite(expected).all():
            raise BackendError(
                f"torch gives non-finite {outputs} on natural frames; the weights are broken, "
                "so the conversion cannot be checked"
            )
        ir = to_openvino(self.ov, self.model, check, self.endpoint)
        exact = self.core.compile_model(ir, "CPU", CHECK_CONFIG)
        self.checked[clip] = exact
        request = exact.create_infer_request()  # not the compiled model's own (see _compile)
        got = request.infer({0: check.numpy()}, share_inputs=False)[0].copy()
        del request
        if got.shape != expected.shape:
            raise BackendError(
                f"OpenVINO's {outputs} have shape {got.shape}, torch's {expected.shape}; "
                "use --backend torch"
            )
        rel = float(np.abs(got - expected).max() / max(float(np.abs(expected).max()), 1e-12))
        if not rel <= CHECK_RTOL:
            raise BackendError(
                f"OpenVINO disagrees with torch on the converted model: relative difference "
                f"of the {outputs} {rel:.3g} > {CHECK_RTOL:g}; use --backend torch"
            )
        return ir

    def _run(self, clips: torch.Tensor) -> torch.Tensor:
        queue = self._queue_for(tuple(clips.shape[1:]), clips.shape[0])
        outputs: list[np.ndarray | None] = [None] * clips.shape[0]

        def done(request: Any, index: int) -> None:
            outputs[index] = request.get_output_tensor(0).data.copy()

        queue.set_callback(done)
        try:
            for index in range(clips.shape[0]):
                queue.start_async({0: clips[index : index + 1].numpy()}, index)
            queue.wait_all()
        except RuntimeError as exc:
            raise BackendError(
                f"OpenVINO inference failed on clips {tuple(clips.shape)}: {exc}"
            ) from exc
        if any(out is None for out in outputs):
            raise BackendError("OpenVINO returned no output for some clips")
        return torch.from_numpy(np.concatenate(outputs))

    def maps(self, clips: torch.Tensor) -> torch.Tensor:
        """The endpoint's maps (M, ...) of normalised clips (M, C, T, H, W), float32 CPU,
        ``chunk_clips`` clips handed to the request queue at a time."""
        if self.endpoint is None:
            raise BackendError("this runner converts the classifier; use predict()")
        clips = clips.to("cpu", torch.float32).contiguous()
        return torch.cat([self._run(chunk) for chunk in clips.split(self.chunk_clips)])


def to_openvino(
    ov: ModuleType, model: nn.Module, example: torch.Tensor, endpoint: str | None = None
) -> Any:
    """An OpenVINO model for ``example``'s shape: from a TorchScript trace (the faster
    build), else from ``torch.export``, whose static shapes make shape-derived values (such
    as Inception's TF-SAME padding) constants that the TorchScript route cannot convert.
    ``endpoint`` names the feature endpoint ``model`` stops at, for the error message."""
    shape = list(example.shape)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and exporter notices
        try:
            # tracing here without trace checking halves convert_model's own tracing time
            traced = torch.jit.trace(model, example, check_trace=False)
            return ov.convert_model(traced, example_input=example, input=[shape])
        except Exception:  # the converter raises many types; torch.export may still work
            pass
        try:
            return ov.convert_model(torch.export.export(model, (example,)))
        except Exception as exc:  # as above
            at = f" at endpoint {endpoint}" if endpoint is not None else ""
            raise BackendError(
                f"openvino.convert_model failed{at}: {type(exc).__name__}: "
                f"{conversion_failure(exc)}; use --backend torch"
            ) from exc


def conversion_failure(exc: Exception) -> str:
    """The useful part of a converter error: its summary of failed operations, if any."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    failed = [line.removeprefix("-- ") for line in lines if line.startswith("-- ")]
    return "; ".join(failed) if failed else (lines[0] if lines else "no message")


def read_calibration_list(path: str | os.PathLike[str]) -> tuple[Path, ...]:
    """The videos a calibration list names (one per line; blank lines and # comments
    skipped, relative paths from the list's folder), each checked to exist."""
    listing = Path(path)
    if not listing.is_file():
        raise BackendError(f"calibration list {listing} does not exist")
    videos = []
    for line in listing.read_text(encoding="utf-8").splitlines():
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        video = Path(name) if Path(name).is_absolute() else listing.parent / name
        if not video.exists():
            raise BackendError(f"calibration list {listing} names {video}, which does not exist")
        videos.append(video)
    if not videos:
        raise BackendError(f"calibration list {listing} names no videos")
    return tuple(videos)


def calibration_digest(videos: tuple[Path, ...]) -> str:
    """SHA-256 of the calibration videos' paths, sizes and modification times."""
    stats = [(str(v.resolve()), v.stat().st_size, v.stat().st_mtime_ns) for v in videos]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()


def calibration_clips(
    videos: tuple[Path, ...], prep: Any, clip: tuple[int, ...]
) -> list[torch.Tensor]:
    """Normalised clips of shape ``clip`` from the first views of each video, as the weights'
    test pipeline cuts them with ``clip``'s length (so every-frame weights, whose clips are
    as long as each video, calibrate from videos of any length; a clip of another
    shape cannot calibrate this model)."""
    from i3d.data.pipeline import build_pipeline

    if prep is None:
        raise BackendError(
            "int8 calibration cuts your videos with the weights' test pipeline, but this "
            "model has no preprocessing metadata; load .safetensors weights"
        )
    pipeline = build_pipeline(prep, "test", clip_len=clip[1])
    clips: list[torch.Tensor] = []
    shapes = set()
    for video in videos:
        taken = 0
        for piece in pipeline.pieces(video, clips_per_piece=1):
            for view in pipeline.normalize(piece.views):
                shapes.add(tuple(view.shape))
                if tuple(view.shape) == clip and taken < CLIPS_PER_VIDEO:
                    clips.append(view)
                    taken += 1
            if taken >= CLIPS_PER_VIDEO or len(clips) >= MAX_CALIBRATION_CLIPS:
                break
    if not clips:
        found = ", ".join("×".join(map(str, s)) for s in sorted(shapes)) or "none"
        raise BackendError(
            f"the calibration videos give clips of {found}, the model runs "
            f"{'×'.join(map(str, clip))}; calibrate with the clip length and crops you run"
        )
    return clips


def int8_cost(core: Any, fp32: Any, quantised: Any, data: list[np.ndarray]) -> tuple[float, float]:
    """(top-1 agreement, max |Δlogit| / max |fp32 logit|) of int8 against fp32 on ``data``."""
    exact = core.compile_model(fp32, "CPU", compile_config("fp32", "latency", None))
    fast = core.compile_model(quantised, "CPU", compile_config("int8", "latency", None))
    want = np.concatenate([exact(x)[0] for x in data])
    got = np.concatenate([fast(x)[0] for x in data])
    agree = float((want.argmax(-1) == got.argmax(-1)).mean())
    return agree, float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-12))


def save_ir(ov: ModuleType, ir: Any, xml: Path) -> None:
    """Save IR as ``xml`` + ``.bin`` atomically: both are written aside, the ``.bin`` renamed
    first, so a reader that finds the ``.xml`` finds its weights complete."""
    folder = Path(tempfile.mkdtemp(prefix=f".{xml.stem}.", dir=xml.parent))
    try:
        with no_room_as_output_error(xml.with_suffix(".bin"), folder / "model.bin", CACHE_HINT):
            ov.save_model(ir, str(folder / "model.xml"), compress_to_fp16=False)
        os.replace(folder / "model.bin", xml.with_suffix(".bin"))
        os.replace(folder / "model.xml", xml)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def endpoint_runner(model: nn.Module, endpoint: str, batch_size: int) -> OpenVinoRunner:
    """An fp32 runner of a loaded recognizer truncated at ``endpoint`` (``i3d features``),
    cached in the i3d cache: its :meth:`~OpenVinoRunner.maps` hands ``batch_size`` clips at a
    time to the request queue, in throughput mode (concurrent requests) for more than one
    clip, else in latency mode. The pooling stays in torch, so one conversion serves every
    pooling of the endpoint."""
    import_openvino()
    names = getattr(model, "endpoint_names", ())
    if endpoint not in names:
        raise BackendError(f"unknown endpoint {endpoint!r}; available: {', '.join(names)}")
    if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in model.parameters()):
        model = copy.deepcopy(model).float().cpu()  # the caller's model stays as it is
    mode = "throughput" if batch_size > 1 else "latency"
    cache = cache_root()
    return OpenVinoRunner(model.eval(), "fp32", batch_size, mode, None, cache, endpoint=endpoint)


class OpenVinoBackend:
    """OpenVINO's CPU plugin: fp32 (exact), bf16 / fp16 where the CPU has the units."""

    name = "openvino"

    def is_available(self) -> Availability:
        try:
            import openvino  # noqa: F401  (an ImportError tells absent from broken)
        except ImportError as exc:
            return Availability(False, missing_reason(exc), None, INSTALL_HINT)
        capabilities = ", ".join(cpu_capabilities(shared_core()))
        return Availability(
            True, f"CPU: {capabilities}", importlib.metadata.version("openvino"), INSTALL_HINT
        )

    def load(
        self,
        weights_or_model: Any,
        device: str | None,
        precision: str,
        batch_size: int | None,
        **options: Any,
    ) -> OpenVinoRunner:
        check_options(options, OPENVINO_OPTIONS, self.name)
        check_precision(precision, tuple(OV_PRECISIONS), self.name)
        if (device or "cpu").strip().lower() != "cpu":
            raise BackendError(f"the openvino backend runs on cpu, not {device!r}")
        mode = str(options.get("mode", "auto")).lower()
        if mode not in (*MODES, "auto"):
            raise BackendError(f"option mode must be auto, latency or throughput, got {mode!r}")
        threads = thread_count(options, self.name)
        import_openvino()  # before the cached Core: says how to install it
        capabilities = cpu_capabilities(shared_core())
        needed = OV_PRECISIONS[precision][1]
        if needed not in capabilities:
            raise BackendError(
                f"precision {precision} needs a CPU with {precision} units (OpenVINO's CPU "
                f"plugin offers {', '.join(capabilities)} here); use --precision fp32"
            )
        calibration: tuple[Path, ...] = ()
        if precision == "int8":
            if "calibration" not in options:
                raise BackendError(
                    "int8 needs calibration videos: pass the option calibration=LIST, a text "
                    "file naming your videos, one per line"
                )
            try:
                import nncf  # noqa: F401
            except ImportError as exc:
                raise BackendUnavailable(f"int8 quantisation needs nncf; {INT8_HINT}") from exc
            calibration = read_calibration_list(options["calibration"])
        elif "calibration" in options:
            raise BackendError("the option calibration is for precision int8")
        from_file = isinstance(weights_or_model, str | os.PathLike)
        cache = cache_root() if parse_flag(options, "cache", from_file) else None
        model = resolve_model(weights_or_model)
        if not from_file:  # the caller's module: snapshot it before changing dtype or mode
            model = copy.deepcopy(model)
        model = model.float().eval()
        return OpenVinoRunner(model, precision, batch_size, mode, threads, cache, calibration)
