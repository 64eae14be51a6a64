"""Export to ONNX (verified against torch with onnxruntime) and to Ascend OM through ATC."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from i3d.backends.base import BackendError, first_line, resolve_model
from i3d.backends.check_input import natural_clips_for
from i3d.backends.float32 import float32_mode
from i3d.utils.files import atomic_path
from i3d.weights.format import WeightsError, WeightsInfo

INPUT_NAME = "clips"
OUTPUT_NAME = "logits"
MIN_OPSET = 17
DEFAULT_OPSET = 18  # the torch.export-based exporter's native opset; 17 is converted down
#: ``--format om`` goes lower (:func:`downgrade_opset`): CANN releases document ONNX opsets
#: 9-13, 11-15 and 9-18, so 11 is the lowest every release in use takes
MIN_OM_OPSET = 11
#: i3d's OM precisions → ATC's --precision_mode and --precision_mode_v2 values
OM_PRECISIONS = {
    "fp32": ("must_keep_origin_dtype", "origin"),
    "fp16": ("force_fp16", "fp16"),
    "mixed": ("allow_mix_precision", "mixed_float16"),
}
#: ONNX metadata key, in the .onnx beside an .om, recording how ATC was asked to build it
OM_BUILD_KEY = "i3d.om_build"

#: hears each step of an export as it starts (a short lowercase phrase), as hub.pull's ``stage``
Stage = Callable[[str], None]


class ExportError(BackendError):
    """An export failed: the exporter, the verification against torch or the ATC conversion."""


@attrs.frozen
class OnnxExport:
    """A written ONNX file and how closely onnxruntime reproduced torch on it."""

    path: Path
    input_shape: tuple[int | str, ...]
    opset: int
    max_abs_diff: float
    rel_diff: float


@attrs.frozen
class OmExport:
    """The ONNX written for ATC, the ATC command, and the OM file if ATC was run."""

    onnx: OnnxExport
    command: tuple[str, ...]
    om_path: Path | None
    replaced_onnx: bool  # an earlier file at the ONNX path was overwritten
    precision: str = "fp16"  # a key of OM_PRECISIONS

    @property
    def command_line(self) -> str:
        return shlex.join(self.command)


def input_shape(
    clip_len: int, size: int, views: int | None, batch: int | str, channels: int = 3
) -> tuple[int | str, ...]:
    """The exported input layout: (B, C, T, S, S), or (B, V, C, T, S, S) with views."""
    if clip_len < 1 or size < 1 or (views is not None and views < 1):
        raise ExportError(
            f"clip_len, size and views must be positive, got {clip_len}, {size}, {views}"
        )
    if batch != "dynamic" and (not isinstance(batch, int) or batch < 1):
        raise ExportError(f"batch must be a positive integer or 'dynamic', got {batch!r}")
    lead: tuple[int | str, ...] = (batch,) if views is None else (batch, views)
    return (*lead, channels, clip_len, size, size)


def _concrete(shape: tuple[int | str, ...], batch: int) -> tuple[int, ...]:
    return tuple(batch if isinstance(d, str) else d for d in shape)


def export_onnx(
    weights_or_model: Any,
    path: str | os.PathLike[str],
    clip_len: int = 32,
    size: int = 256,
    views: int | None = None,
    batch: int | str = 1,
    opset: int = DEFAULT_OPSET,
    simplify: bool = False,
    rtol: float = 1e-4,
    stage: Stage | None = None,
) -> OnnxExport:
    """Export a model to ONNX, then check onnxruntime against torch before writing ``path``.

    The file is written atomically and only if max|ort - torch| / max|torch| <= ``rtol``.
    Weights loaded from a file keep their metadata (labels, preprocessing) in the ONNX file.
    ``batch="dynamic"`` makes the batch axis symbolic; clip length and size stay fixed.
    ``stage`` hears each step as it starts (running torch once, tracing, saving, onnxsim,
    the onnxruntime check); it is never called while the exporter's output is muted.
    """
    stage = stage or (lambda _what: None)
    if Path(path).suffix != ".onnx":
        raise ExportError(f"ONNX output must end in .onnx (the onnx backend needs it), got {path}")
    if opset < MIN_OPSET:
        raise ExportError(f"opset must be at least {MIN_OPSET}, got {opset}")
    if simplify and importlib.util.find_spec("onnxsim") is None:
        raise ExportError("--simplify needs onnxsim: pip install onnxsim")
    for module in ("onnx", "onnxruntime", "onnxscript"):
        _require(module, "pip install onnx onnxruntime onnxscript (the i3d onnx extra)")
    model = copy.deepcopy(resolve_model(weights_or_model)).float().eval()
    channels = getattr(model, "in_channels", None)
    if channels is None:
        raise ExportError(
            f"{type(model).__name__} is not a single-input recognizer (no in_channels); "
            "export two-stream models one stream at a time"
        )
    shape = input_shape(clip_len, size, views, batch, channels)
    stage(f"running torch once on a {'×'.join(map(str, _concrete(shape, 1)))} input")
    _check_runs(model, _concrete(shape, 1))
    dynamic = batch == "dynamic"
    example = torch.randn(_concrete(shape, 2), generator=torch.Generator().manual_seed(0))
    with atomic_path(path) as tmp:
        _torch_export(model, example, tmp, opset, dynamic, stage, Path(path).name)
        if simplify:
            stage("simplifying the graph (onnxsim)")
            _simplify(tmp)
        _embed_weights_info(model, tmp)
        stage("checking onnxruntime against torch")
        # natural frames, not randn: white noise drives realistic residual and non-local
        # blocks to inf/NaN logits, which would refuse every export of such weights
        check = natural_clips_for(model, _concrete(shape, 3))
        max_abs, rel = verify_onnx(model, tmp, check)
        if not rel <= rtol:
            raise ExportError(
                f"onnxruntime disagrees with torch: max abs diff {max_abs:.3g}, relative "
                f"{rel:.3g} > {rtol:g}; the ONNX file was not written"
            )
    return OnnxExport(Path(path), shape, opset, max_abs, rel)


def _check_runs(model: torch.nn.Module, shape: tuple[int, ...]) -> None:
    """Run ``model`` once on a batch-1 input so a clip it cannot process fails in one line.

    The exporter traces with fake tensors and logs every failing op before raising; a clip
    too short or too small for the network's strides is caught here instead.
    """
    clip_len, height, width = shape[-3:]
    try:
        with torch.no_grad():
            model(torch.zeros(shape))
    except (RuntimeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"the model cannot run on clips of {clip_len}×{height}×{width} (T×H×W): {reason}; "
            "use a longer --clip-len or a larger --size"
        ) from exc


def _require(module: str, hint: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ExportError(f"ONNX export needs {module}: {hint}")


def _torch_export(
    model: torch.nn.Module,
    example: torch.Tensor,
    dst: Path,
    opset: int,
    dynamic: bool,
    stage: Stage,
    name: str,
) -> None:
    # torch.export-based exporter: static dims stay Python ints while tracing, so runtime
    # padding computed from the input shape (Inception's TF-SAME) becomes constants; only
    # the batch axis is symbolic with a dynamic batch.
    shapes = ({0: torch.export.Dim("batch", min=1, max=65536)},) if dynamic else None
    stage("tracing the model (torch.export)")
    with _muted_exporter():
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamic_shapes=shapes,
            verbose=False,
        )
    stage(f"saving {name}")
    with _muted_exporter():
        program.save(str(dst), external_data=False)  # one self-contained file
    import onnx

    try:
        onnx.checker.check_model(str(dst))
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"exported ONNX model is invalid: {exc}") from exc
    proto = onnx.load(str(dst), load_external_data=False)
    produced = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if produced != opset:
        raise ExportError(
            f"the exporter could not convert this model to opset {opset} (it produced "
            f"{produced}); use --opset {produced}"
        )


@contextlib.contextmanager
def _muted_exporter() -> Iterator[None]:
    """Swallow the exporter's prints, logs and warnings; its failures become one-line errors.

    ``sys.stdout`` / ``sys.stderr`` are swapped for the block, so nothing that reports to
    the user (``stage``) may be called inside it.
    """
    chatter = io.StringIO()  # progress, and graphs the tracer prints when it fails
    with (
        _quiet_torch_logs(),
        warnings.catch_warnings(),
        contextlib.redirect_stdout(chatter),
        contextlib.redirect_stderr(chatter),
    ):
        warnings.simplefilter("ignore")  # exporter deprecation notices
        try:
            yield
        except Exception as exc:  # the exporter raises many unrelated types
            root = _root_cause(exc)
            first = next((line for line in str(root).splitlines() if line.strip()), "")
            raise ExportError(f"torch.onnx.export failed: {type(root).__name__}: {first}") from exc


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """Mute torch's loggers (exporter notices, fake-tensor tracebacks) for the block.

    torch's loggers write to their own stderr handlers without propagating; failures are
    raised as :class:`ExportError` instead, so their logs would only repeat them at length.
    """
    manager = logging.Logger.manager
    loggers = [logging.getLogger("torch")] + [
        logger
        for name, logger in list(manager.loggerDict.items())
        if name.startswith("torch.") and isinstance(logger, logging.Logger)
    ]
    levels = [logger.level for logger in loggers]
    for logger in loggers:  # loggers created later inherit the "torch" logger's level
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost cause: the exporter wraps model errors in long diagnostic reports."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _embed_weights_info(model: torch.nn.Module, dst: Path) -> None:
    """Copy the weights' metadata (config, labels, preprocessing) into ONNX metadata_props."""
    info = getattr(model, "weights_info", None)
    if info is None:
        return
    import onnx

    proto = onnx.load(str(dst))
    for key, value in info.to_metadata().items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(dst))


def read_onnx_info(path: str | os.PathLike[str]) -> WeightsInfo | None:
    """The labels / preprocessing / config that ``export_onnx`` embedded, or None if absent."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf decode errors have no common base class
        raise ExportError(f"{path} is not a readable ONNX file: {exc}") from exc
    meta = {prop.key: prop.value for prop in proto.metadata_props}
    try:
        return WeightsInfo.from_metadata_if_any(meta, path)
    except WeightsError as exc:  # its message names the file already
        raise ExportError(str(exc)) from exc


def _simplify(dst: Path) -> None:
    import onnx
    import onnxsim

    simplified, ok = onnxsim.simplify(onnx.load(str(dst)))
    if not ok:
        raise ExportError("onnxsim could not validate the simplified model")
    onnx.save(simplified, str(dst))


def verify_onnx(
    model: torch.nn.Module, onnx_path: str | os.PathLike[str], x: torch.Tensor
) -> tuple[float, float]:
    """(max abs diff, diff relative to max|torch|) between onnxruntime (CPU) and torch on ``x``."""
    import onnxruntime as ort

    with torch.inference_mode(), float32_mode("cpu"):
        expected = model(x).float().numpy()
    if not np.isfinite(expected).all():
        raise ExportError("torch produced non-finite logits on the check input; cannot verify")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    if got.shape != expected.shape:
        raise ExportError(f"onnxruntime output shape {got.shape} != torch {expected.shape}")
    max_abs = float(np.abs(got - expected).max())
    return max_abs, max_abs / max(float(np.abs(expected).max()), 1e-12)


def atc_command(
    onnx_path: str | os.PathLike[str],
    om_stem: str | os.PathLike[str],
    shape: tuple[int | str, ...],
    soc: str,
    precision: str = "fp16",
    precision_v2: bool = False,
) -> tuple[str, ...]:
    """The ATC call converting ``onnx_path`` to an OM under ``om_stem`` for ``soc`` (static shape).

    ``precision`` (fp32, fp16, mixed) is always passed, as ``--precision_mode`` or with
    ``precision_v2`` as ``--precision_mode_v2`` (CANN 8), so the OM's precision is known.
    """
    if any(isinstance(d, str) for d in shape):
        raise ExportError("OM models need a static batch; pass --batch N, not dynamic")
    if precision not in OM_PRECISIONS:
        raise ExportError(
            f"OM precision must be one of {', '.join(OM_PRECISIONS)}, got {precision!r}"
        )
    dims = ",".join(str(d) for d in shape)
    # ATC's --input_format for ONNX models accepts NCHW (the default), NCDHW and ND (ND only
    # up to 4 dims): https://www.hiascend.com/document/detail/en/canncommercial/800/devaids/
    # atc/atlasatcparam_16_0015.html. NCDHW is the layout of a (B, C, T, H, W) clip; the
    # docs name no format for 6-D (B, V, C, T, H, W) input, which keeps the default NCHW.
    layout = "NCDHW" if len(shape) == 5 else "NCHW"
    mode, mode_v2 = OM_PRECISIONS[precision]
    return (
        "atc",
        "--framework=5",
        f"--model={onnx_path}",
        f"--output={om_stem}",
        f"--input_format={layout}",
        f"--input_shape={INPUT_NAME}:{dims}",
        f"--soc_version={soc}",
        f"--precision_mode_v2={mode_v2}" if precision_v2 else f"--precision_mode={mode}",
    )


def export_om(
    weights_or_model: Any,
    path: str | os.PathLike[str],
    soc: str = "Ascend310P3",
    clip_len: int = 32,
    size: int = 256,
    views: int | None = None,
    batch: int = 1,
    opset: int = DEFAULT_OPSET,
    simplify: bool | None = None,
    stage: Stage | None = None,
    precision: str = "fp16",
    precision_v2: bool = False,
) -> OmExport:
    """Write ``path`` minus .om + ``.onnx``, then run ATC if it is on PATH (else only plan it).

    The ONNX file stays beside the OM on purpose: ATC drops ONNX metadata, so it is where
    ``i3d predict`` finds the OM's labels, preprocessing and build precision. An existing
    file there is replaced (``replaced_onnx`` says so). The graph is made ATC-compatible
    (max-pools' pads folded in, ``opset`` down to 11, onnxsim when installed unless
    ``simplify=False``) and checked with onnxruntime. With ATC present the OM is built in a
    temporary folder and renamed onto ``path``. ``stage`` hears each step as it starts.
    """
    stage = stage or (lambda _what: None)
    path = Path(path)
    if path.suffix != ".om":
        raise ExportError(f"OM output must end in .om, got {path}")
    if not MIN_OM_OPSET <= opset <= DEFAULT_OPSET:
        raise ExportError(
            f"--format om takes --opset {MIN_OM_OPSET} to {DEFAULT_OPSET}, got {opset}"
        )
    shape = input_shape(clip_len, size, views, batch)
    atc_command("model.onnx", "model", shape, soc, precision)  # validates before exporting
    if simplify is None:  # as the seeds' om recipe did, whenever onnxsim is there
        simplify = importlib.util.find_spec("onnxsim") is not None
    onnx_path = path.with_suffix(".onnx")
    replaced = onnx_path.exists()
    model = resolve_model(weights_or_model)
    # exported at 18: the exporter's own down-conversion fails on Inception's Pad nodes
    onnx_export = export_onnx(
        model, onnx_path, clip_len, size, views, batch, DEFAULT_OPSET, simplify, stage=stage
    )
    onnx_export = _atc_ready(model, onnx_export, opset, {"precision": precision, "soc": soc}, stage)
    final = atc_command(
        onnx_export.path, path.with_suffix(""), onnx_export.input_shape, soc, precision,
        precision_v2,
    )  # fmt: skip
    if shutil.which("atc") is None:
        return OmExport(onnx_export, final, None, replaced, precision)
    stage(f"converting to {path.name} (atc, soc {soc})")
    with _atc_temp_stem(path) as stem:
        command = atc_command(
            onnx_export.path, stem, onnx_export.input_shape, soc, precision, precision_v2
        )
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip()[-2000:]
            raise ExportError(f"atc failed (exit {result.returncode}): {tail}")
        os.replace(_produced_om(stem.parent), path)
    return OmExport(onnx_export, final, path, replaced, precision)


def _atc_ready(
    model: torch.nn.Module,
    exported: OnnxExport,
    opset: int,
    build: dict[str, str],
    stage: Stage,
) -> OnnxExport:
    """Rewrite the exported ONNX for ATC, record ``build`` in it, and check it with onnxruntime.

    Max-pools' Pad nodes become the pools' own pads, then the graph is rewritten for ``opset``.
    """
    import json

    import onnx

    stage(f"preparing the graph for atc (opset {opset})")
    proto = onnx.load(str(exported.path))
    fold_pads_into_pools(proto)
    if opset < exported.opset:
        downgrade_opset(proto, opset)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ExportError(
            f"the graph prepared for atc at opset {opset} is invalid: {first_line(exc)}; "
            f"use a higher --opset (up to {DEFAULT_OPSET})"
        ) from exc
    kept = [p for p in proto.metadata_props if p.key != OM_BUILD_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    entry = proto.metadata_props.add()
    entry.key, entry.value = OM_BUILD_KEY, json.dumps(build)
    stage("checking onnxruntime against torch")
    with atomic_path(exported.path) as tmp:
        onnx.save(proto, str(tmp))
        check = natural_clips_for(model, _concrete(exported.input_shape, 3))  # as export_onnx
        max_abs, rel = verify_onnx(copy.deepcopy(model).float().eval(), tmp, check)
        if not rel <= 1e-4:
            raise ExportError(
                f"onnxruntime disagrees with torch on the graph prepared for atc: max abs "
                f"diff {max_abs:.3g}, relative {rel:.3g}; the ONNX file was not written"
            )
    return attrs.evolve(exported, opset=opset, max_abs_diff=max_abs, rel_diff=rel)


def fold_pads_into_pools(proto: Any) -> int:
    """Move each -inf Pad that only feeds MaxPools into their ``pads``; returns how many.

    TF-SAME max-pools export as Pad(constant, -inf) + MaxPool, and ATC's Pad only takes 0.
    MaxPool's own (asymmetric) pads never win the max, exactly as -inf cells do.
    """
    from onnx import numpy_helper

    graph = proto.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    graph_outputs = {out.name for out in graph.output}
    folded = [pad for pad in graph.node if _fold_pad(pad, readers, constants, graph_outputs)]
    for pad in folded:
        graph.node.remove(pad)
    return len(folded)


def _fold_pad(
    pad: Any, readers: dict[str, list[Any]], constants: dict[str, Any], outputs: set[str]
) -> bool:
    """Fold one Pad node into the MaxPools reading it, if that is exact; True when done."""
    from onnx import helper

    if pad.op_type != "Pad" or pad.output[0] in outputs:
        return False
    pools = readers.get(pad.output[0], [])
    inputs = [*pad.input, "", "", ""][:4]
    mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
    pads, value = constants.get(inputs[1]), constants.get(inputs[2])
    if (
        not pools
        or any(p.op_type != "MaxPool" for p in pools)
        or mode != b"constant"
        or inputs[3]  # explicit axes
        or pads is None
        or value is None
        or not np.isneginf(value).all()
    ):
        return False
    flat = [int(v) for v in pads.reshape(-1)]
    rank = len(flat) // 2
    begin, end = flat[:rank], flat[rank:]
    if min(flat) < 0 or begin[:2] != [0, 0] or end[:2] != [0, 0]:
        return False  # negative pads crop; batch/channel pads are not a pool's to take
    for pool in pools:
        if any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET") for a in pool.attribute):
            return False
    for pool in pools:
        own = next((list(a.ints) for a in pool.attribute if a.name == "pads"), None)
        extra = begin[2:] + end[2:]
        merged = [o + p for o, p in zip(own or [0] * len(extra), extra, strict=True)]
        kept = [a for a in pool.attribute if a.name != "pads"]
        del pool.attribute[:]
        pool.attribute.extend([*kept, helper.make_attribute("pads", merged)])
        pool.input[0] = pad.input[0]
    return True


#: ops whose versions from opset 11 to 18 differ only in the element types they accept
#: (float32 graphs are unaffected) or in attributes i3d's exports never set
_TYPE_ONLY_CHANGES = frozenset(
    {
        "Add", "AveragePool", "Cast", "Concat", "Constant", "Conv", "Div", "Flatten", "Gather",
        "Gemm", "GlobalAveragePool", "Identity", "MatMul", "MaxPool", "Mul", "Relu", "Sigmoid",
        "Slice", "Sub", "Transpose",
    }
)  # fmt: skip


def downgrade_opset(proto: Any, opset: int) -> None:
    """Rewrite an opset-18 ONNX graph in place as an ``opset`` one (11 to 17), exactly.

    onnx's version converter has no down-adapters for Relu-14, Add-14 or Concat-13 and leaves
    ReduceMean-18's ``noop_with_empty_axes`` on ReduceMean-13, so the few ops whose signature
    changed are rewritten here; anything else is refused. onnxruntime checks the result.
    """
    from onnx import defs, helper, numpy_helper

    constants = {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    for node in proto.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        same = (
            defs.get_schema(node.op_type, opset).since_version
            == defs.get_schema(node.op_type, DEFAULT_OPSET).since_version
        )
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if same:
            continue
        if node.op_type in _TYPE_ONLY_CHANGES:
            if node.op_type == "Constant" and set(attributes) != {"value"}:  # value_* are 12+
                raise ExportError(
                    f"cannot take a Constant with {sorted(attributes)} to opset {opset}; "
                    f"use a higher --opset (up to {DEFAULT_OPSET})"
                )
            continue
        if node.op_type == "Reshape" and _allowzero_droppable(node, attributes, constants):
            _drop_attributes(node, "allowzero")
        elif node.op_type == "Pad" and not (len(node.input) > 3 and node.input[3]):
            del node.input[3:]
        elif node.op_type == "ReduceMean" and not attributes.get("noop_with_empty_axes"):
            _drop_attributes(node, "noop_with_empty_axes")
            if len(node.input) > 1 and node.input[1]:
                if node.input[1] not in constants:
                    raise ExportError("cannot take a ReduceMean with computed axes below 18")
                axes = [int(a) for a in constants[node.input[1]].reshape(-1)]
                node.attribute.append(helper.make_attribute("axes", axes))
                del node.input[1:]
        else:
            raise ExportError(
                f"cannot take {node.op_type} from opset {DEFAULT_OPSET} to {opset}; "
                f"use a higher --opset (up to {DEFAULT_OPSET})"
            )
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = opset


def _allowzero_droppable(node: Any, attributes: dict[str, Any], constants: dict[str, Any]) -> bool:
    """Whether dropping Reshape's ``allowzero`` keeps it exact: off, or a constant shape
    without zeros (where 0 could mean "copy this dim" instead of "size 0")."""
    if not attributes.get("allowzero"):
        return True
    shape = constants.get(node.input[1])
    return shape is not None and 0 not in shape.reshape(-1).tolist()


def _drop_attributes(node: Any, *names: str) -> None:
    kept = [a for a in node.attribute if a.name not in names]
    del node.attribute[:]
    node.attribute.extend(kept)


def read_om_build(onnx_path: str | os.PathLike[str]) -> dict[str, str] | None:
    """The build settings :func:`export_om` recorded in ``onnx_path`` (None if it has none)."""
    import json

    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    value = next((p.value for p in proto.metadata_props if p.key == OM_BUILD_KEY), None)
    if value is None:
        return None
    try:
        record = json.loads(value)
    except ValueError as exc:
        raise ExportError(f"{onnx_path}: unreadable {OM_BUILD_KEY} metadata: {exc}") from exc
    if not isinstance(record, dict) or record.get("precision") not in OM_PRECISIONS:
        raise ExportError(f"{onnx_path}: {OM_BUILD_KEY} metadata names no known precision")
    return record


def _produced_om(folder: Path) -> Path:
    """The one .om ATC wrote in ``folder``; it may name it ``<stem>_<os>_<arch>.om``."""
    produced = sorted(folder.glob("*.om"))
    if len(produced) != 1:
        found = ", ".join(p.name for p in produced) or "none"
        raise ExportError(
            f"atc reported success but wrote {len(produced)} .om files ({found}) in {folder}, "
            "expected one; run the printed atc command by hand to see what it did"
        )
    return produced[0]


@contextlib.contextmanager
def _atc_temp_stem(path: Path) -> Iterator[Path]:
    """A stem in a new folder beside ``path`` for ATC to write its .om under; removed after."""
    folder = Path(tempfile.mkdtemp(prefix=f".{path.stem}.", dir=path.parent))
    try:
        yield folder / path.stem
    finally:
        shutil.rmtree(folder, ignore_errors=True)
