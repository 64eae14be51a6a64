"""Training: schedules, lr scaling, checkpoints, single/multi-process runs, exact resume."""

from __future__ import annotations

import errno
import functools
import importlib.machinery
import importlib.util
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
from fresh import in_fresh_python
from typer.testing import CliRunner

from i3d.cli.main import app
from i3d.data.datasets import AnnotationError
from i3d.data.decode import open_video
from i3d.data.toy import TOY_CLASSES, ToySpec, make_toy_dataset
from i3d.distributed import PG_BACKENDS, DistContext, DistributedError, device_for, free_port
from i3d.train import TrainConfig, TrainingError, TrainingInterrupted, train
from i3d.train import checkpoint as ckpt
from i3d.train.loop import (
    EpochSampler,
    LossDiverged,
    Trainer,
    amp_dtype,
    choose_algorithms,
    grad_scaler,
)
from i3d.train.recipe import ConfigError, get_recipe
from i3d.train.schedule import build_scheduler, lr_factor
from i3d.utils.files import OutputError
from i3d.weights.format import load_model, load_weights

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy")
    make_toy_dataset(
        out, ToySpec(classes=2, videos_per_class=6, val_per_class=2, frames=8, size=32)
    )
    return out


def tiny(toy: Path, work_dir: Path, **overrides) -> TrainConfig:
    base = dict(
        train_list=str(toy / "train.txt"),
        val_list=str(toy / "val.txt"),
        data_root=str(toy),
        labels=str(toy / "labels.txt"),
        model_overrides={"depth": 18, "base_channels": 4},
        clip_len=8,
        frame_interval=1,
        resize_short=32,
        input_size=32,
        epochs=4,
        batch_size=4,
        lr=0.02,
        scale_lr=False,
        dropout=0.0,
        workers=0,
        val_every=2,
        save_every=2,
        log_every=1,
        work_dir=str(work_dir),
    )
    base.update(overrides)
    return TrainConfig(**base)


# ---------------------------------------------------------------- schedules and recipe
def _mmengine_cosine(base: float, eta_min: float, t_max: int, steps: int) -> list[float]:
    """mmengine CosineAnnealingLR's recursive (chainable) update, step by step."""
    lrs = [base]
    for t in range(1, steps):
        prev = lrs[-1]
        if (t - 1 - t_max) % (2 * t_max) == 0:
            lrs.append(prev + (base - eta_min) * (1 - math.cos(math.pi / t_max)) / 2)
        else:
            ratio = (1 + math.cos(math.pi * t / t_max)) / (1 + math.cos(math.pi * (t - 1) / t_max))
            lrs.append(ratio * (prev - eta_min) + eta_min)
    return lrs


def _mmengine_linear(start: float, total: int) -> list[float]:
    """mmengine LinearLR's recursive factor for the first ``total`` iterations."""
    factors = [start]
    for t in range(1, total):
        factors.append(factors[-1] * (1 + (1 - start) / (total * start + (t - 1) * (1 - start))))
    return factors


def test_step_schedule_matches_mmaction_multistep():
    config = TrainConfig()  # milestones 40, 80; gamma 0.1; lr 0.01 per 64 clips, 8 per device
    iters = 7
    expected = {0: 1.0, 39: 1.0, 40: 0.1, 79: 0.1, 80: 0.01, 99: 0.01}
    for epoch, factor in expected.items():
        for it in (0, iters - 1):
            assert lr_factor(config, epoch * iters + it, iters) == pytest.approx(factor)


def test_cosine_and_warmup_match_mmengine_definitions():
    config = TrainConfig(schedule="cosine", epochs=5, eta_min=1e-4, scale_lr=False)
    iters = 6
    reference = _mmengine_cosine(config.lr, config.eta_min, 5 * iters, 5 * iters)
    ours = [config.lr * lr_factor(config, s, iters) for s in range(5 * iters)]
    np.testing.assert_allclose(ours, reference, rtol=1e-9)
    warm = attrs.evolve(config, warmup_epochs=1.5, warmup_ratio=0.1)
    factors = _mmengine_linear(0.1, 9)
    for step in range(12):
        cosine = lr_factor(config, step, iters)
        expect = cosine * (factors[step] if step < 9 else 1.0)
        assert lr_factor(warm, step, iters) == pytest.approx(expect, rel=1e-9)


def test_scheduler_drives_optimizer_per_iteration():
    config = TrainConfig(milestones=(1, 2), epochs=3, scale_lr=False)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=config.effective_lr)
    sched = build_scheduler(opt, config, iters_per_epoch=2)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(seen, [0.01, 0.01, 0.001, 0.001, 1e-4, 1e-4])


def test_lr_is_scaled_by_global_batch():
    assert TrainConfig().effective_lr == pytest.approx(0.01 * 8 / 64)
    assert TrainConfig(world_size=8).effective_lr == pytest.approx(0.01)  # the 8×8 recipe
    assert TrainConfig(batch_size=16, world_size=2, lr=0.02).effective_lr == pytest.approx(0.01)
    assert TrainConfig(batch_size=16, scale_lr=False).effective_lr == 0.01


def test_recipe_defaults_are_the_mmaction_i3d_recipe():
    c = TrainConfig()
    assert (c.momentum, c.weight_decay, c.grad_clip, c.dropout) == (0.9, 1e-4, 40.0, 0.5)
    assert (c.epochs, c.milestones, c.gamma, c.base_batch_size) == (100, (40, 80), 0.1, 64)
    prep = c.preprocessing()
    assert (prep.clip_len, prep.frame_interval, prep.resize_short, prep.input_size) == (
        32,
        2,
        256,
        224,
    )
    assert c.crop_scales == (1.0, 0.8) and c.flip_ratio == 0.5
    assert TrainConfig.from_json(c.to_json()) == c


# ---------------------------------------------------------------- toy data
def test_toy_dataset_writes_videos_and_lists(toy):
    lines = (toy / "train.txt").read_text().split("\n")
    assert len([x for x in lines if x]) == 12
    assert (toy / "labels.txt").read_text().split("\n")[:2] == list(TOY_CLASSES[:2])
    path, label = lines[0].split()
    with open_video(toy / path) as reader:
        assert reader.num_frames == 8
        frames = reader.get_frames(np.arange(8))
    assert frames.shape == (8, 32, 32, 3) and int(label) in (0, 1)
    with pytest.raises(ValueError, match="classes"):
        ToySpec(classes=9)


# ---------------------------------------------------------------- checkpoints
def test_rng_state_round_trip():
    state = ckpt.rng_state()
    a = (np.random.rand(), torch.rand(2), __import__("random").random())
    ckpt.set_rng_state(state)
    b = (np.random.rand(), torch.rand(2), __import__("random").random())
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and a[2] == b[2]


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    state = {"model": {"w": torch.ones(3)}, "optimizer": {}, "scheduler": {}, "scaler": {}}
    state.update(epoch=1, step=5, rng=[ckpt.rng_state()], config="{}")
    first = ckpt.save_checkpoint(tmp_path, state)

    def full_disk(obj, path):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OutputError, match="intact"):
        ckpt.save_checkpoint(tmp_path, {**state, "step": 9})
    assert ckpt.list_checkpoints(tmp_path) == [first]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [first.name]
    assert torch.equal(ckpt.load_checkpoint(first)["model"]["w"], torch.ones(3))
    # a corrupt newer file is passed over by --resume auto
    (tmp_path / "checkpoints" / "epoch0002_step000000010.pt").write_bytes(b"garbage")
    path, _ = ckpt.resolve_resume("auto", tmp_path)
    assert path == first


# ---------------------------------------------------------------- runs
def test_single_process_run_learns_and_exports(toy, tmp_path):
    lines = (toy / "train.txt").read_text().splitlines()
    few = [x for x in lines if x.endswith(" 0")][:2] + [x for x in lines if x.endswith(" 1")][:2]
    (tmp_path / "few.txt").write_text("\n".join(few))  # one batch, fitted step after step
    work = tmp_path / "run"
    config = tiny(toy, work, train_list=str(tmp_path / "few.txt"), epochs=10, lr=0.02)
    summary = train(attrs.evolve(config, crop_scales=(1.0,), flip_ratio=0.0, val_every=5))
    losses = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in losses if r["kind"] == "train"]
    assert np.mean(train_losses[-2:]) < 0.5 * np.mean(train_losses[:2])
    assert {"clips_per_s", "data_wait", "lr"} <= set(losses[0])
    assert (work / "curves.png").stat().st_size > 1000
    model = load_model(work / "last.safetensors")
    assert model.weights_info.labels == TOY_CLASSES[:2]
    assert model.weights_info.preprocessing.clip_len == 8
    assert (work / "best.safetensors").is_file() and summary["best_top1"] is not None
    assert summary["steps"] == 10 and Path(summary["checkpoint"]).is_file()
    started = json.loads((work / "config.json").read_text())
    assert TrainConfig.from_json(json.dumps(started["train"])).epochs == 10
    assert (started["model"]["depth"], started["labels"]) == (18, list(TOY_CLASSES[:2]))
    assert (started["steps_per_epoch"], started["devices"]) == (1, "1 x cpu")


def record_rank_metrics(event, ctx, info):
    """Hook for spawned workers: each rank records its reduced validation metrics."""
    if event == "val":
        out = Path(os.environ["I3D_TEST_OUT"]) / f"rank{ctx.rank}_step{info['count']}.json"
        with out.open("a") as fh:
            fh.write(json.dumps(info) + "\n")


def test_two_process_gloo_run(toy, tmp_path, monkeypatch):
    monkeypatch.setenv("I3D_TEST_OUT", str(tmp_path))
    work = tmp_path / "ddp"
    summary = train(tiny(toy, work, world_size=2, batch_size=2, epochs=4), hook=record_rank_metrics)
    rank0 = (tmp_path / "rank0_step4.0.json").read_text()
    rank1 = (tmp_path / "rank1_step4.0.json").read_text()
    assert rank0 == rank1 and len(rank0.splitlines()) == 2  # identical all-reduced metrics
    records = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    steps = [(r["kind"], r["step"]) for r in records]
    assert len(steps) == len(set(steps)) == 4 * 3 + 2  # one writer: no duplicated lines
    assert summary["steps"] == 12
    assert ckpt.load_checkpoint(summary["checkpoint"])["rng"].__len__() == 2


def test_torchrun_job_is_joined_not_respawned(toy, tmp_path):
    work = tmp_path / "torchrun"
    args = ["--train-list", str(toy / "train.txt"), "--data-root", str(toy)]
    args += ["--val-list", str(toy / "val.txt"), "--labels", str(toy / "labels.txt")]
    args += ["--depth", "18", "--base-channels", "4", "--clip-len", "8", "--frame-interval", "1"]
    args += ["--size", "32", "--short-side", "32", "--epochs", "2", "--batch-size", "2"]
    args += ["--lr", "0.02", "--no-scale-lr", "--workers", "0", "--val-every", "2"]
    args += ["--world-size", "5", "--work-dir", str(work)]  # ignored: torchrun decides
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    launcher += ["--master-port", str(free_port()), "-m", "i3d", "train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    proc = subprocess.run(
        [*launcher, *args], cwd=ROOT, capture_output=True, text=True, timeout=180, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: 6 steps") == 1, proc.stdout  # rank 0 alone reports
    summary = json.loads((work / "summary.json").read_text())
    assert summary["steps"] == 2 * 3  # 12 videos / (2 per device × 2 devices) per epoch
    state = ckpt.load_checkpoint(summary["checkpoint"])
    assert len(state["rng"]) == 2  # one RNG state per torchrun worker
    records = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert len({(r["kind"], r["step"]) for r in records}) == len(records)  # rank 0 writes


def test_epoch_position_carries_over_to_another_world_size(toy, tmp_path):
    trainer = Trainer(tiny(toy, tmp_path / "w"), DistContext())
    dataset, seed = trainer.train_set, 0

    def remaining(world: int, batch: int, done_batches: int) -> list[int]:
        keys = []
        for rank in range(world):
            sampler = EpochSampler(dataset, DistContext(rank=rank, world_size=world), seed)
            sampler.set_epoch(3)
            sampler.start = done_batches * batch
            keys += [i for _, i in sampler]
        return sorted(keys)

    # 12 videos, global batch 4: after one step the same 8 samples remain, however split
    assert remaining(2, 2, 1) == remaining(1, 4, 1) == remaining(4, 1, 1)
    assert len(remaining(1, 4, 1)) == 8


def test_resume_on_another_world_size_keeps_the_schedule(toy, tmp_path, capsys):
    work = tmp_path / "elastic"
    train(tiny(toy, work, world_size=2, batch_size=2, epochs=2, val_list=None))
    capsys.readouterr()
    config = tiny(toy, work, world_size=1, batch_size=4, epochs=3, val_list=None, resume="auto")
    summary = train(config)
    assert "written by 2 workers, this run has 1" in capsys.readouterr().out
    assert summary["steps"] == 3 * 3
    steps = [json.loads(x)["step"] for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 10))
    with pytest.raises(ckpt.CheckpointError, match="global batch 4"):
        train(attrs.evolve(config, batch_size=2, epochs=4))


def crash_on_rank1(event, ctx, info):
    """Hook: rank 1 fails at its second step."""
    if event == "step" and ctx.rank == 1 and info["step"] == 2:
        raise RuntimeError("simulated worker crash")


def test_crashed_worker_stops_the_job(toy, tmp_path):
    config = tiny(toy, tmp_path / "crash", world_size=2, batch_size=2, timeout_s=30)
    with pytest.raises(DistributedError, match="rank 1 failed: RuntimeError: simulated"):
        train(config, hook=crash_on_rank1)


@pytest.mark.parametrize("world_size", [1, 2])
def test_nan_loss_stops_with_step_and_keeps_checkpoint(toy, tmp_path, world_size):
    config = tiny(toy, tmp_path / "nan", lr=1e12, grad_clip=None, epochs=3, save_every_steps=1)
    config = attrs.evolve(config, world_size=world_size, batch_size=4 // world_size)
    with pytest.raises(LossDiverged, match=r"loss became (nan|inf) at step (\d+)") as err:
        train(config)
    step = int(err.value.args[0].split("at step ")[1].split()[0])
    newest = ckpt.list_checkpoints(tmp_path / "nan")[0]
    assert ckpt.load_checkpoint(newest)["step"] == step - 1
    assert "last good checkpoint" in str(err.value)


def signal_at_step_2(signum, event, ctx, info):
    if event == "step" and info["step"] == 2:
        os.kill(os.getpid(), signum)


def _ctrl_c_config(toy: Path, work_dir: Path) -> TrainConfig:
    # 2 epochs of 3 steps: the stop at step 2 is mid-epoch, and the resumed run still
    # crosses an epoch boundary (the next epoch's shuffle, dropout RNG, optimizer state)
    return tiny(toy, work_dir, epochs=2, dropout=0.3, deterministic=True, val_list=None)


@pytest.fixture(scope="module")
def uninterrupted_ctrl_c_run(toy, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The weights the interrupted runs must resume to: one uninterrupted run, shared by
    both signals (it does not depend on which one stops the other run)."""
    work_dir = tmp_path_factory.mktemp("ctrl_c_full")
    train(_ctrl_c_config(toy, work_dir))
    return load_weights(work_dir / "last.safetensors")[0]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_saves_a_resumable_checkpoint(
    toy, tmp_path, signum, uninterrupted_ctrl_c_run, monkeypatch
):
    """Ctrl-C, and SIGTERM (torchrun's shutdown of its workers, a scheduler's preemption)."""
    config = _ctrl_c_config(toy, tmp_path / "int")
    name = signal.Signals(signum).name
    with pytest.raises(TrainingInterrupted, match=rf"interrupted \({name}\) .*--resume auto"):
        train(config, hook=functools.partial(signal_at_step_2, signum))
    state = ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path / "int")[0])
    assert (state["step"], state["batch"]) == (2, 2)
    assert (tmp_path / "int" / "last.safetensors").is_file()
    # the curve plot (tested in test_single_process_run_learns_and_exports, drawn above on
    # the way out of the interrupted run) is no part of resuming: skip its second drawing
    monkeypatch.setattr("i3d.train.loop.plot_curves", lambda *args, **kwargs: None)
    train(attrs.evolve(config, resume="auto"))
    a = uninterrupted_ctrl_c_run
    b, _ = load_weights(tmp_path / "int" / "last.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the interrupted run resumed exactly


_KILLED_RUN = """
import os, signal, sys, torch
torch.set_num_threads(2)
from i3d.train import TrainConfig, train
def hook(event, ctx, info):
    if event == "step" and info["step"] == 5:
        os.kill(os.getpid(), signal.SIGKILL)
train(TrainConfig.from_json(sys.argv[1]), hook=hook)
"""


def test_sigkill_mid_epoch_then_resume_is_bitwise_exact(toy, tmp_path):
    config = tiny(toy, tmp_path / "full", epochs=3, dropout=0.3, deterministic=True)
    train(config)
    killed = attrs.evolve(config, work_dir=str(tmp_path / "killed"), save_every_steps=2, workers=2)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_KILLED_RUN), killed.to_json()],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    state = ckpt.load_checkpoint(ckpt.list_checkpoints(killed.work_dir)[0])
    assert (state["epoch"], state["batch"], state["step"]) == (1, 1, 4)  # mid-epoch
    train(attrs.evolve(killed, resume="auto"))
    a, _ = load_weights(tmp_path / "full" / "last.safetensors")
    b, _ = load_weights(tmp_path / "killed" / "last.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_channels_last_trains_in_ndhwc_to_the_same_weights(toy, tmp_path):
    """--channels-last lays the weights (and clips) out NDHWC, as the checkpoint's strides
    show, and trains to the default layout's weights up to kernel rounding (BN over batches
    of 4 amplifies it to about 1e-4 of the weights in 3 steps; the kernels differ by CPU)."""
    weights = {}
    for layout in ("default", "channels_last"):
        config = tiny(toy, tmp_path / layout, epochs=1, val_list=None, deterministic=True,
                      channels_last=layout == "channels_last")  # fmt: skip
        train(config)
        state = ckpt.load_checkpoint(ckpt.list_checkpoints(config.work_dir)[0])
        convs = [t for t in state["model"].values() if t.ndim == 5 and t[0, 0].numel() > 1]
        ndhwc = [t.is_contiguous(memory_format=torch.channels_last_3d) for t in convs]
        assert convs and ndhwc == [layout == "channels_last"] * len(convs)
        weights[layout], _ = load_weights(tmp_path / layout / "last.safetensors")
    a, b = weights["default"], weights["channels_last"]
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a if a[k].is_floating_point()])
    whole = torch.cat([a[k].flatten() for k in a if a[k].is_floating_point()])
    # 3 steps of kernel rounding: 1.6e-4 of the weights' norm on an AMD EPYC (its largest
    # element 6.8e-4 apart), less on Intel; a layout mistake would be of the weights' order
    assert float(diff.norm() / whole.norm()) < 1e-3


def test_deepmind_inception_recipe_trains(toy, tmp_path):
    """The second recipe: Inception-v1 I3D, [-1, 1] inputs, no grad clip (T >= 9, 224 px)."""
    two = tmp_path / "two.txt"
    two.write_text("\n".join((toy / "train.txt").read_text().splitlines()[:2]))
    config = get_recipe(
        "deepmind_inception",
        train_list=str(two),
        data_root=str(toy),
        labels=str(toy / "labels.txt"),
        clip_len=10,
        resize_short=224,
        batch_size=2,
        epochs=1,
        workers=0,
        lr=0.01,
        scale_lr=False,
        work_dir=str(tmp_path / "dm"),
    )
    summary = train(config)
    model = load_model(tmp_path / "dm" / "last.safetensors")
    assert summary["steps"] == 1 and model.config.arch == "inception_i3d"
    assert model.config.head.num_classes == 2
    assert model.weights_info.preprocessing.value_range == (-1.0, 1.0)
    with pytest.raises(ConfigError, match="--freeze-stages applies to ResNet3d"):
        train(attrs.evolve(config, freeze_stages=2, work_dir=str(tmp_path / "frozen")))


def test_cli_fine_tunes_pulled_style_inception_weights(toy, tmp_path):
    """`--init` with DeepMind-style Inception weights (400 classes, every-frame protocol):
    its head is ``logits.conv3d``, replaced for the toy's 2 classes, the trunk loaded."""
    from i3d.models import build_model, get_preset
    from i3d.weights.format import WeightsInfo, save_weights
    from i3d.weights.labels import kinetics_labels
    from i3d.weights.preprocessing import DEEPMIND_K400

    torch.manual_seed(0)
    source = build_model(get_preset("inception_i3d_rgb"))
    init = tmp_path / "i3d_inception_k400_rgb.safetensors"
    info = WeightsInfo(source.config, kinetics_labels(400), DEEPMIND_K400)
    save_weights(init, source.state_dict(), info)
    two = tmp_path / "two.txt"
    two.write_text("\n".join((toy / "train.txt").read_text().splitlines()[:2]))
    args = ["train", "--recipe", "deepmind_inception", "--init", str(init), "--train-list",
            str(two), "--data-root", str(toy), "--labels", str(toy / "labels.txt"),
            "--clip-len", "10", "--size", "224", "--short-side", "224", "--batch-size", "2",
            "--epochs", "1", "--workers", "0", "--lr", "0.001", "--no-scale-lr",
            "--work-dir", str(tmp_path / "ft")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    after, info = load_weights(tmp_path / "ft" / "last.safetensors")
    assert info.config.head.num_classes == 2 and info.labels == tuple(TOY_CLASSES[:2])
    assert after["logits.conv3d.weight"].shape[0] == 2  # a fresh 2-class head
    before = source.state_dict()["Conv3d_1a_7x7.conv3d.weight"]
    trained = after["Conv3d_1a_7x7.conv3d.weight"]
    # trained from the init (a fresh init would differ by ~1.4x its norm)
    assert 0 < (trained - before).norm() < 0.2 * before.norm()


def test_init_from_an_inflated_2d_resnet(toy, tmp_path):
    from test_inflate import _resnet2d

    from i3d.weights.inflate import convert_torchvision_2d

    torch.save(_resnet2d(18, 4).state_dict(), tmp_path / "r18_2d.pth")
    init, _ = convert_torchvision_2d(tmp_path / "r18_2d.pth", tmp_path / "init.safetensors")
    config = tiny(toy, tmp_path / "inflated", init=str(init), model_overrides={}, epochs=1)
    train(attrs.evolve(config, val_list=None))
    before, _ = load_weights(init)
    after, info = load_weights(tmp_path / "inflated" / "last.safetensors")
    assert info.config.depth == 18 and info.config.head.num_classes == 2
    assert after["cls_head.fc_cls.weight"].shape == (2, 32)  # fresh 2-class head
    stem = "backbone.conv1.conv.weight"
    assert not torch.equal(before[stem], after[stem])  # the inflated backbone was trained


def test_persistent_workers_draw_each_epochs_own_samples(toy, tmp_path):
    trainer = Trainer(tiny(toy, tmp_path / "w", workers=2), DistContext())
    loader = trainer._loader(trainer.train_set, trainer.sampler, train=True)
    assert loader.persistent_workers
    epochs = []
    for epoch in (0, 1):
        trainer.sampler.set_epoch(epoch)
        keys = list(trainer.sampler)
        clips = torch.cat([batch[0] for batch in loader])
        expected = torch.stack([trainer.train_set.load(i, e)[0] for e, i in keys])
        assert {e for e, _ in keys} == {epoch} and torch.equal(clips, expected)
        epochs.append(clips)
    assert not torch.equal(epochs[0], epochs[1])


def test_finetune_with_new_head_and_frozen_backbone(toy, tmp_path):
    source = tmp_path / "src"
    train(tiny(toy, source, epochs=1, val_list=None))
    four = tmp_path / "four.txt"  # relabel to 3 classes: the head must be re-initialised
    lines = (toy / "train.txt").read_text().splitlines()
    four.write_text("\n".join(f"{p} {i % 3}" for i, (p, _) in enumerate(x.split() for x in lines)))
    config = tiny(
        toy,
        tmp_path / "ft",
        init=str(source / "last.safetensors"),
        train_list=str(four),
        val_list=None,
        labels=None,
        model_overrides={},
        freeze_stages=4,
        epochs=1,
    )
    train(config)
    before, _ = load_weights(source / "last.safetensors")
    after, info = load_weights(tmp_path / "ft" / "last.safetensors")
    assert info.config.head.num_classes == 3 and after["cls_head.fc_cls.weight"].shape[0] == 3
    assert info.labels == ("class_0", "class_1", "class_2")
    backbone = [k for k in before if k.startswith("backbone.")]
    assert all(torch.equal(before[k], after[k]) for k in backbone)


# ---------------------------------------------------------------- devices and CLI
def test_npu_plumbing_with_a_fake_torch_npu(monkeypatch):
    calls = []
    fake = types.SimpleNamespace(
        is_available=lambda: True, device_count=lambda: 8, set_device=calls.append
    )
    module = types.ModuleType("torch_npu")
    module.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)  # find_spec sees it
    scaler = types.SimpleNamespace(GradScaler=lambda enabled: ("torch_npu scaler", enabled))
    module.npu = types.SimpleNamespace(amp=scaler)
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    monkeypatch.setattr(torch, "npu", fake, raising=False)
    if torch._C._get_privateuse1_backend_name() != "npu":
        torch.utils.rename_privateuse1_backend("npu")  # what torch_npu does on import
    device = device_for("npu", 3)
    assert (device.type, device.index, calls) == ("npu", 3, [3])
    assert PG_BACKENDS[device.type] == "hccl" and amp_dtype(device) == torch.float16
    assert grad_scaler(device, True) == ("torch_npu scaler", True)
    assert grad_scaler(torch.device("cpu"), True).is_enabled()
    with pytest.raises(DistributedError, match="only 8 npu devices"):
        device_for("npu", 8)
    monkeypatch.delitem(sys.modules, "torch_npu")
    if importlib.util.find_spec("torch_npu") is None:  # the same install hint as the backend
        with pytest.raises(DistributedError, match="torch_npu is not installed; pip install"):
            device_for("npu", 0)
    assert amp_dtype(torch.device("cpu")) == torch.bfloat16


def test_cli_make_toy_dataset_and_train_errors(tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli_toy"
    args = ["make-toy-dataset", str(out), "--classes", "3", "--videos-per-class", "1"]
    result = runner.invoke(app, [*args, "--val-per-class", "1", "--frames", "6", "--size", "32"])
    assert result.exit_code == 0, result.output
    assert len((out / "train.txt").read_text().splitlines()) == 3
    # the printed hint is the README's small run (not a 100-epoch full-size model), and works
    hint = next(line for line in result.output.splitlines() if line.startswith("i3d train "))
    words = shlex.split(hint)[1:]
    assert {"--depth", "--base-channels", "--clip-len"} <= set(words) and "12" in words
    words[words.index("--epochs") + 1] = "1"
    words[words.index("--workers") + 1] = "0"
    words[words.index("--work-dir") + 1] = str(tmp_path / "hinted")
    trained = runner.invoke(app, words)
    assert trained.exit_code == 0, trained.output
    assert (tmp_path / "hinted" / "last.safetensors").is_file()
    result = runner.invoke(app, ["train", "--train-list", str(tmp_path / "missing.txt")])
    assert result.exit_code == 1 and "does not exist" in result.output
    result = runner.invoke(app, ["make-toy-dataset", str(out), "--size", "33"])
    assert result.exit_code == 1 and "even" in result.output


class _Touch:
    """Pickles to a call that creates ``marker``: loading it must not run that call."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_unreadable_checkpoint_is_refused_without_unsafe_advice(toy, tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint\n")
    marker = tmp_path / "ran"
    code = tmp_path / "code.pth"
    torch.save({"format": ckpt.CHECKPOINT_FORMAT, "model": _Touch(marker)}, code)
    for path in (garbage, code):
        with pytest.raises(ckpt.CheckpointError, match="is not a readable i3d training") as info:
            ckpt.resolve_resume(str(path), tmp_path)
        assert "weights_only" not in str(info.value) and "\n" not in str(info.value)
    assert "refused" in str(info.value) and not marker.exists()
    args = ["train", "--train-list", str(toy / "train.txt"), "--data-root", str(toy)]
    args += ["--labels", str(toy / "labels.txt"), "--depth", "18", "--base-channels", "4"]
    args += ["--clip-len", "8", "--size", "32", "--epochs", "1", "--batch-size", "4"]
    args += ["--workers", "0", "--work-dir", str(tmp_path / "wd"), "--resume", str(garbage)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert f"{garbage} is not a readable i3d training checkpoint" in result.output
    assert "weights_only" not in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--set", "depth=34", "--depth", "18"], "--set depth=34 conflicts with --depth 18"),
        (
            ["--set", "base_channels=abc"],
            '--set base_channels="abc": ResNet3dConfig.base_channels must be an int, got "abc"',
        ),
        (
            ["--set", "base_channels=2.5"],
            "--set base_channels=2.5: ResNet3dConfig.base_channels must be an int, got 2.5 (float)",
        ),
        (
            ["--set", "with_pool1=1"],
            "--set with_pool1=1: ResNet3dConfig.with_pool1 must be true or false, got 1 (int)",
        ),
        (
            ["--set", "style=keras"],
            '--set style="keras": ResNet3dConfig.style must be one of "pytorch", "caffe", '
            'got "keras"',
        ),
        (
            ["--set", "inflate=3"],
            "--set inflate=3: ResNet3dConfig.inflate must be a list with one entry per stage",
        ),
        (
            ["--set", "inflate=[1,2,1,1]"],
            "--set inflate=[1, 2, 1, 1]: ResNet3dConfig.inflate[1] must be a 0/1 flag",
        ),
        (
            ["--set", "conv1_kernel=577"],
            "--set conv1_kernel=577: ResNet3dConfig.conv1_kernel must be a list of ints, got 577",
        ),
        (["--set", "depht=18"], "--set depht: ResNet3dConfig has no field 'depht'"),
        (["--set", "frozen_stages=2"], "--set frozen_stages: use --freeze-stages instead"),
        (["--set", 'head={"num_classes": 3}'], "--set head: head is a nested HeadConfig"),
        (
            ["--recipe", "deepmind_inception", "--set", "in_channels=rgb"],
            '--set in_channels="rgb": InceptionI3dConfig.in_channels must be an int, got "rgb"',
        ),
    ],
)
def test_cli_set_overrides_are_checked_by_name_and_type(tmp_path, options, message):
    missing = tmp_path / "missing.txt"
    result = CliRunner().invoke(app, ["train", "--train-list", str(missing), *options])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_cli_set_agreeing_with_an_option_and_valid_values_pass_the_check(tmp_path):
    missing = tmp_path / "missing.txt"
    args = ["train", "--train-list", str(missing), "--set", "depth=18", "--depth", "18"]
    result = CliRunner().invoke(app, [*args, "--set", "inflate=[1,1,1,1]", "--set", "style=caffe"])
    assert result.exit_code == 1 and "does not exist" in result.output  # reached the data


def test_a_run_failing_before_any_output_leaves_no_work_dir(toy, tmp_path):
    work = tmp_path / "never"
    with pytest.raises(AnnotationError, match=r"missing\.txt"):
        train(tiny(toy, work, train_list=str(tmp_path / "missing.txt")))
    assert not work.exists()


def test_class_names_follow_labels_or_the_dataset(toy, tmp_path):
    tree = tmp_path / "tree"
    lines = (toy / "train.txt").read_text().splitlines()
    for line in lines:
        rel, label = line.split()
        folder = tree / TOY_CLASSES[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / Path(rel).name).symlink_to(toy / rel)
    config = tiny(toy, tmp_path / "w", train_list=str(tree), val_list=None, labels=None)
    trainer = Trainer(config, DistContext())
    assert trainer.labels == tuple(sorted(TOY_CLASSES[:2]))  # the folder names
    (tmp_path / "labels.txt").write_text("\n".join(reversed(sorted(TOY_CLASSES[:2]))))
    trainer = Trainer(attrs.evolve(config, labels=str(tmp_path / "labels.txt")), DistContext())
    assert trainer.labels == tuple(reversed(sorted(TOY_CLASSES[:2])))
    for sample in trainer.train_samples:
        assert trainer.labels[sample.label] == sample.path.parent.name


# ---------------------------------------------------------------- mixed precision
def test_fp16_loss_scaling_backs_off_on_overflow_and_resumes_exactly(toy, tmp_path, monkeypatch):
    """fp16 autocast + GradScaler, the cuda/npu AMP path, run on cpu: an initial scale too
    large for fp16 gradients overflows, those steps are skipped and the scale backs off; the
    scaler state travels in checkpoints, so a resumed run ends bitwise equal."""
    big = 2.0**20
    scaler = functools.partial(torch.amp.GradScaler, init_scale=big, growth_interval=2)
    monkeypatch.setattr(torch.amp, "GradScaler", scaler)
    config = tiny(toy, tmp_path / "full", amp=True, amp_dtype="fp16", dropout=0.3)
    config = attrs.evolve(config, deterministic=True, save_every_steps=2, keep_checkpoints=0)
    train(config)
    lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    scales = [r["loss_scale"] for r in map(json.loads, lines) if r["kind"] == "train"]
    assert len(scales) == 12 and scales[0] < big  # the first step overflowed and was skipped
    mid = next(
        p for p in ckpt.list_checkpoints(config.work_dir) if p.name.endswith("step000000004.pt")
    )
    state = ckpt.load_checkpoint(mid)
    assert (state["batch"], state["scaler"]["scale"]) == (1, scales[3])
    train(attrs.evolve(config, work_dir=str(tmp_path / "resumed"), resume=str(mid)))
    a, _ = load_weights(tmp_path / "full" / "last.safetensors")
    b, _ = load_weights(tmp_path / "resumed" / "last.safetensors")
    assert all(torch.isfinite(a[k]).all() for k in a if a[k].is_floating_point())
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_may_switch_fp16_loss_scaling_on_or_off(toy, tmp_path, capsys):
    config = tiny(toy, tmp_path / "wd", epochs=1, val_list=None, amp=True, amp_dtype="fp16")
    train(config)
    capsys.readouterr()
    train(attrs.evolve(config, epochs=2, amp=False, resume="auto"))
    out = " ".join(capsys.readouterr().out.split())
    assert "was saved with fp16 loss scaling and this run does not use it" in out
    summary = train(attrs.evolve(config, epochs=3, resume="auto"))
    out = " ".join(capsys.readouterr().out.split())
    assert "was not saved with fp16 loss scaling and this run uses it" in out
    assert summary["steps"] == 9


def test_resume_with_other_epochs_warns_that_cosine_is_replanned(toy, tmp_path, capsys):
    config = tiny(toy, tmp_path / "wd", epochs=1, val_list=None, schedule="cosine")
    train(attrs.evolve(config, epochs=2, work_dir=str(tmp_path / "short")))
    train(config)  # one epoch of a one-epoch cosine: the lr reached eta_min
    capsys.readouterr()
    summary = train(attrs.evolve(config, epochs=2, resume="auto"))
    out = " ".join(capsys.readouterr().out.split())
    assert "1-epoch cosine schedule; with --epochs 2 the schedule is re-planned" in out
    assert "Resume with --epochs 1 to keep it" in out and summary["steps"] == 6
    train(attrs.evolve(config, epochs=2, work_dir=str(tmp_path / "short"), resume="auto"))
    assert "re-planned" not in capsys.readouterr().out  # same --epochs: nothing to say


def test_amp_dtype_is_chosen_per_device_or_by_name():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert (amp_dtype(cpu), amp_dtype(cuda)) == (torch.bfloat16, torch.float16)
    assert (amp_dtype(cpu, "fp16"), amp_dtype(cuda, "bf16")) == (torch.float16, torch.bfloat16)
    result = CliRunner().invoke(app, ["train", "--train-list", "x.txt", "--amp-dtype", "half"])
    assert result.exit_code == 1
    assert "amp dtype must be auto, fp16 or bf16, got 'half'" in result.output


def test_sync_bn_on_cpu_is_refused_before_any_worker_starts(toy, tmp_path):
    with pytest.raises(ConfigError, match="sync-bn needs cuda or npu devices"):
        tiny(toy, tmp_path / "sbn", world_size=2, sync_bn=True)


class _Board:
    """Records what the trainer sends to TensorBoard."""

    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []
        self.closed = False

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def close(self) -> None:
        self.closed = True


def test_metrics_reach_tensorboard_when_it_is_installed(toy, tmp_path, monkeypatch):
    board = _Board()
    monkeypatch.setattr("i3d.train.loop._tensorboard", lambda work_dir: board)
    train(tiny(toy, tmp_path / "tb", epochs=2))
    tags = {tag for tag, _, _ in board.scalars}
    assert {"train/loss", "train/lr", "train/clips_per_s", "val/top1", "val/top5"} <= tags
    lines = (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()
    val = [r for r in map(json.loads, lines) if r["kind"] == "val"][-1]
    assert ("val/top1", val["top1"], val["step"]) in board.scalars and board.closed


def test_deterministic_runs_choose_deterministic_kernels(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    try:
        choose_algorithms(True)
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        choose_algorithms(False)
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=True)
        torch.backends.cudnn.benchmark = before[1]
        torch.backends.cudnn.deterministic = False


def test_a_fresh_run_never_overwrites_an_earlier_run(toy, tmp_path):
    config = tiny(toy, tmp_path / "wd", epochs=1, val_list=None)
    train(config)
    metrics = (tmp_path / "wd" / "metrics.jsonl").read_text()
    with pytest.raises(TrainingError, match=r"already holds a training run .* --resume auto"):
        train(attrs.evolve(config, epochs=2))
    assert (tmp_path / "wd" / "metrics.jsonl").read_text() == metrics
    assert train(attrs.evolve(config, epochs=2, resume="auto"))["steps"] == 6


_CTRL_C_TWO_WORKERS = """
import os, signal, sys
from i3d.train import TrainConfig, TrainingInterrupted, train

def press_ctrl_c(event, ctx, info):
    # Ctrl-C in a terminal: SIGINT to the whole process group (launcher, ranks, loaders)
    if event == "step" and ctx.rank == 0 and info["step"] == 2:
        os.killpg(os.getpgid(0), signal.SIGINT)

if __name__ == "__main__":
    try:
        train(TrainConfig.from_json(sys.argv[1]), hook=press_ctrl_c)
    except TrainingInterrupted as exc:
        print(exc)
        sys.exit(3)
"""


_SIGTERM_TO_GROUP = """
import os, signal, sys, time
from i3d.train import TrainConfig, TrainingInterrupted, train

def scheduler_stops_the_job(event, ctx, info):
    # timeout / scancel: another process sends SIGTERM to the whole process group, loader
    # workers included (torch's workers exit quietly only when their parent sends it); the
    # pause lets the workers' deaths reach the main process while it is busy elsewhere
    if event == "step" and info["step"] == 2:
        group = os.getpgid(0)
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            os.killpg(group, signal.SIGTERM)
            os._exit(0)
        time.sleep(0.5)

if __name__ == "__main__":
    try:
        train(TrainConfig.from_json(sys.argv[1]), hook=scheduler_stops_the_job)
    except TrainingInterrupted as exc:
        print(exc)
        sys.exit(3)
"""


def test_sigterm_to_the_process_group_with_loader_workers_saves(toy, tmp_path):
    """Loader workers ended by the group's SIGTERM must not crash the run (torch raises
    wherever the main process is when a worker dies of a signal)."""
    config = tiny(toy, tmp_path / "term", epochs=2, val_list=None, workers=2)
    script = tmp_path / "sigterm.py"
    script.write_text(_SIGTERM_TO_GROUP)
    proc = subprocess.run(
        [sys.executable, str(script), config.to_json()],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        start_new_session=True,
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "interrupted (SIGTERM) at step 2" in proc.stdout
    state = ckpt.load_checkpoint(ckpt.list_checkpoints(config.work_dir)[0])
    assert state["step"] == 2
    assert (tmp_path / "term" / "last.safetensors").is_file()


def test_ctrl_c_with_two_workers_saves_and_resumes_exactly(toy, tmp_path):
    config = tiny(toy, tmp_path / "full", world_size=2, batch_size=2, epochs=2, val_list=None)
    config = attrs.evolve(config, dropout=0.3, deterministic=True, workers=1)
    train(config)
    script = tmp_path / "ctrl_c.py"
    script.write_text(_CTRL_C_TWO_WORKERS)
    stopped = attrs.evolve(config, work_dir=str(tmp_path / "stopped"))
    proc = subprocess.run(
        [sys.executable, str(script), stopped.to_json()],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        start_new_session=True,  # its own process group, so the signal stays inside it
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    # the signal came after step 2: every rank stops at that boundary, as one process does
    assert "interrupted (SIGINT) at step 2" in proc.stdout and "resume auto" in proc.stdout
    state = ckpt.load_checkpoint(ckpt.list_checkpoints(stopped.work_dir)[0])
    assert (state["step"], len(state["rng"])) == (2, 2)
    assert (tmp_path / "stopped" / "last.safetensors").is_file()
    train(attrs.evolve(stopped, resume="auto"))
    a, _ = load_weights(tmp_path / "full" / "last.safetensors")
    b, _ = load_weights(tmp_path / "stopped" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_non_deterministic_run_does_not_pay_for_torch_inductor():
    """``use_deterministic_algorithms`` imports torch._inductor (~1.4 s a rank): only called
    when it changes the setting."""
    in_fresh_python(
        "import sys",
        "from i3d.train.loop import choose_algorithms",
        "choose_algorithms(False)",
        "assert 'torch._inductor' not in sys.modules",
    )
