"""The training loop: one worker per device, exact resume, guarded steps, rank-0 output.

``train(config)`` runs a whole job (spawning workers when ``world_size > 1``) and returns
rank 0's summary. Every random draw that shapes the weights is either per sample
(``sample_rng(seed, epoch, index)`` in the dataset), per epoch (the sampler's shuffle) or in
a checkpointed RNG state, so a resumed run continues exactly where the saved one stopped.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from i3d.data.datasets import (
    VideoDataset,
    check_labels,
    dataset_class_names,
    load_annotations,
    skip_collate,
    worker_loader,
)
from i3d.data.pipeline import build_pipeline
from i3d.distributed import DistContext, all_reduce_sum, barrier, launch
from i3d.models import build_model, get_preset
from i3d.models.config import ConfigError, config_to_dict
from i3d.train import checkpoint as ckpt
from i3d.train.recipe import TrainConfig
from i3d.train.report import MetricsLog, plot_curves
from i3d.train.schedule import build_scheduler, lr_factor
from i3d.utils.files import atomic_path, ensure_dir
from i3d.weights.format import Provenance, WeightsInfo, load_weights, save_weights
from i3d.weights.labels import read_labels

Hook = Callable[[str, DistContext, dict[str, Any]], None]


class TrainingError(RuntimeError):
    """The run stopped for a reason the user must act on (diverged loss, empty data...)."""


class TrainingInterrupted(TrainingError):
    """Ctrl-C or SIGTERM: a resumable checkpoint was written before stopping."""


#: signals that stop a run after the current step, with a checkpoint
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class LossDiverged(TrainingError):
    """The loss became NaN or infinite on some rank; every rank stops at the same step."""


#: stops every rank agrees on (all-reduced), so a spawned job reports them as they are
_AGREED_STOPS = (TrainingInterrupted, LossDiverged)


def train(config: TrainConfig, hook: Hook | None = None) -> dict[str, Any]:
    """Run a training job; return rank 0's summary (metrics, exported files, checkpoint).

    ``hook(event, ctx, info)`` is called on every rank after each step (``"step"``) and each
    validation (``"val"``); it must be a module-level function when workers are spawned.
    With ``world_size > 1`` workers are spawned, so a script calling this needs the
    ``if __name__ == "__main__":`` guard.
    """
    work_dir = Path(config.work_dir)
    earlier = ckpt.list_checkpoints(work_dir)
    if config.resume is None and earlier:  # a fresh run would overwrite that run's files
        raise TrainingError(
            f"{work_dir} already holds a training run (newest checkpoint {earlier[0].name}); "
            "continue it with --resume auto, or give another --work-dir"
        )
    created = not work_dir.exists()
    ensure_dir(work_dir)
    try:
        return launch(
            _worker,
            (config, hook),
            config.backend,
            config.world_size,
            config.timeout_s,
            passthrough=_AGREED_STOPS,
        )
    except BaseException:
        if created and not any(work_dir.iterdir()):
            work_dir.rmdir()  # a run that failed before writing anything leaves no folder
        raise


def _worker(ctx: DistContext, payload: tuple[TrainConfig, Hook | None]) -> dict[str, Any]:
    config, hook = payload
    return Trainer(config, ctx, hook).run()


class EpochSampler(DistributedSampler):
    """DistributedSampler (shuffled per epoch from ``seed + epoch``) that can start mid-epoch.

    It yields ``(epoch, index)`` keys, so the epoch whose random draws a sample uses travels
    with the key and reaches persistent DataLoader workers.
    """

    def __init__(self, dataset: VideoDataset, ctx: DistContext, seed: int) -> None:
        super().__init__(dataset, ctx.world_size, ctx.rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self):
        return iter([(self.epoch, i) for i in list(super().__iter__())[self.start :]])

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(Sampler[int]):
    """Every ``world``-th index from ``rank``: each validation sample seen exactly once."""

    def __init__(self, size: int, ctx: DistContext) -> None:
        self.indices = list(range(ctx.rank, size, ctx.world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def model_config(config: TrainConfig, num_classes: int, base: Any | None = None) -> Any:
    """Architecture of the run: ``base`` (from --init) or the preset with overrides applied."""
    head = {"num_classes": num_classes, "dropout": config.dropout}
    preset = base if base is not None else get_preset(config.preset)
    freeze = _freeze_option(preset, config.freeze_stages)
    if base is not None:
        if config.model_overrides:
            raise ConfigError("model overrides cannot change the architecture of an --init file")
        return attrs.evolve(base, head=attrs.evolve(base.head, **head), **freeze)
    try:
        return get_preset(config.preset, **dict(config.model_overrides), **head, **freeze)
    except TypeError as exc:
        raise ConfigError(f"invalid model override: {exc}") from None


def _freeze_option(model: Any, stages: int) -> dict[str, int]:
    """``frozen_stages`` for architectures that have it (ResNet3d); -1 (none) fits every model."""
    if any(f.name == "frozen_stages" for f in attrs.fields(type(model))):
        return {"frozen_stages": stages}
    if stages != -1:
        raise ConfigError(
            f"--freeze-stages applies to ResNet3d models; {type(model).__name__} has no stages "
            "to freeze"
        )
    return {}


def amp_dtype(device: torch.device, choice: str = "auto") -> torch.dtype:
    """Autocast dtype: ``auto`` is fp16 on accelerators (with a GradScaler), bf16 on cpu.

    bf16 on an NPU without it (a 310P) is refused: torch would silently turn autocast off.
    """
    if choice == "auto":
        return torch.bfloat16 if device.type == "cpu" else torch.float16
    if choice == "bf16" and device.type == "npu" and not torch.npu.is_bf16_supported():
        raise ConfigError(
            "--amp-dtype bf16: this NPU has no bf16 (torch.npu.is_bf16_supported() is false, "
            "as on a 310P), and torch would silently train without autocast; use --amp-dtype "
            "fp16"
        )
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[choice]


def grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """The loss scaler for ``device``: torch_npu's own on Ascend (its documented form)."""
    if device.type == "npu":
        import torch_npu  # imported by device_for already; this only looks it up

        return torch_npu.npu.amp.GradScaler(enabled=enabled)
    return torch.amp.GradScaler(device.type, enabled=enabled)


def choose_algorithms(deterministic: bool) -> None:
    """Deterministic kernels for bitwise-reproducible runs; otherwise let cuDNN autotune its
    convolutions (training clips all have one shape, so the search pays off after a step)."""
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts
    if deterministic or torch.are_deterministic_algorithms_enabled():
        # only when it changes something: the call imports torch._inductor (~1.4 s)
        torch.use_deterministic_algorithms(deterministic, warn_only=True)


class Trainer:
    """One rank's share of a training job."""

    def __init__(self, config: TrainConfig, ctx: DistContext, hook: Hook | None = None) -> None:
        self.config, self.ctx, self.hook = config, ctx, hook
        self.work_dir = Path(config.work_dir)
        self.console = Console(quiet=not ctx.is_main, soft_wrap=True)
        self.stop_requested = False
        self.stop_signal = ""
        self._seed_everything(config.seed + ctx.rank)
        choose_algorithms(config.deterministic)
        self._build_data()
        self._build_model()
        self.optimizer = torch.optim.SGD(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=config.effective_lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
        self.scheduler = build_scheduler(self.optimizer, config, self.iters_per_epoch)
        self.amp_dtype = amp_dtype(ctx.device, config.amp_dtype if config.amp else "auto")
        # fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range
        use_scaler = config.amp and self.amp_dtype == torch.float16
        self.scaler = grad_scaler(ctx.device, use_scaler)
        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        self.best_top1 = -1.0
        self.last_checkpoint: Path | None = None
        self.metrics = MetricsLog(self.work_dir / "metrics.jsonl", enabled=ctx.is_main)

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    # ---------------------------------------------------------------- setup
    def _build_data(self) -> None:
        c = self.config
        if c.train_list is None:
            raise ConfigError("no training data: pass --train-list (an mmaction-style list)")
        root = c.data_root or None
        names = read_labels(c.labels) if c.labels else dataset_class_names(c.train_list)
        self.train_samples = load_annotations(c.train_list, root, labels=names)
        self.val_samples = (
            load_annotations(c.val_list, root, labels=names or dataset_class_names(c.val_list))
            if c.val_list
            else []
        )
        self.init_tensors, self.init_info = load_weights(c.init) if c.init else (None, None)
        if names is not None:
            self.labels: tuple[str, ...] = names
        else:
            top = max(s.label for s in self.train_samples + self.val_samples)
            self.labels = tuple(f"class_{i}" for i in range(top + 1))
        check_labels(self.train_samples + self.val_samples, len(self.labels))
        base_prep = self.init_info.preprocessing if self.init_info is not None else None
        self.preprocessing = c.preprocessing(base_prep)
        train_pipe = build_pipeline(
            self.preprocessing, "train", flip_ratio=c.flip_ratio, scales=c.crop_scales
        )
        self.train_set = VideoDataset(self.train_samples, train_pipe, seed=c.seed)
        self.sampler = EpochSampler(self.train_set, self.ctx, c.seed)
        self.train_loader: DataLoader | None = None
        self.iters_per_epoch = self.sampler.num_samples // c.batch_size
        if self.iters_per_epoch < 1:
            raise ConfigError(
                f"{len(self.train_samples)} training samples cannot fill one global batch of "
                f"{c.global_batch} ({c.batch_size} per device × {c.world_size}); lower --batch-size"
            )
        val_pipe = build_pipeline(self.preprocessing, "val")
        self.val_set = VideoDataset(self.val_samples, val_pipe, seed=c.seed)

    def _loader(self, dataset: VideoDataset, sampler: Sampler[int], train: bool) -> DataLoader:
        c = self.config
        return worker_loader(
            dataset,
            c.workers,
            batch_size=c.batch_size,
            sampler=sampler,
            collate_fn=skip_collate,
            drop_last=train,
            pin_memory=self.ctx.device.type == "cuda",
            persistent_workers=train and c.workers > 0,
            # a private generator: creating an iterator must not consume the global torch RNG
            generator=torch.Generator().manual_seed(c.seed),
        )

    @property
    def memory_format(self) -> torch.memory_format:
        """How weights and training clips are laid out (``--channels-last``)."""
        return torch.channels_last_3d if self.config.channels_last else torch.contiguous_format

    def _build_model(self) -> None:
        c = self.config
        base = self.init_info.config if self.init_info is not None else None
        self.model_config = model_config(c, len(self.labels), base)
        model = build_model(self.model_config)
        if self.init_tensors is not None:
            tensors = dict(self.init_tensors)
            head = model.classifier_keys()
            if any(tensors[k].shape != model.state_dict()[k].shape for k in head if k in tensors):
                for key in head:  # new class count: keep the fresh head
                    tensors.pop(key, None)
            missing, unexpected = model.load_state_dict(tensors, strict=False)
            if unexpected or set(missing) - set(head):
                raise ConfigError(
                    f"--init {c.init} does not fit its own config: missing {missing[:4]}, "
                    f"unexpected {unexpected[:4]}"
                )
        if c.sync_bn and self.ctx.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.raw_model = model.to(self.ctx.device, memory_format=self.memory_format)
        self.raw_model.train()
        self.model: nn.Module = self.raw_model
        if self.ctx.distributed:
            device_ids = None if self.ctx.device.type == "cpu" else [self.ctx.device.index]
            self.model = nn.parallel.DistributedDataParallel(self.raw_model, device_ids=device_ids)

    # ---------------------------------------------------------------- checkpoints
    def _state(self, rngs: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "batch": self.batch_in_epoch,
            "step": self.step,
            "best_top1": self.best_top1,
            "rng": rngs,
            "config": self.config.to_json(),
            "model_config": json.dumps(config_to_dict(self.model_config)),
        }

    def _gather_rng(self) -> list[dict[str, Any]]:
        """Every rank's RNG states (each rank draws its own dropout masks)."""
        state = ckpt.rng_state()
        if not self.ctx.distributed:
            return [state]
        gathered: list[Any] = [None] * self.ctx.world_size
        torch.distributed.all_gather_object(gathered, state)
        return gathered

    def save_checkpoint(self) -> None:
        """Rank 0 writes the checkpoint (ranks hold identical weights); all ranks wait."""
        rngs = self._gather_rng()  # a collective: every rank takes part
        if self.ctx.is_main:
            self.last_checkpoint = ckpt.save_checkpoint(
                self.work_dir, self._state(rngs), self.config.keep_checkpoints
            )
        barrier(self.ctx)

    def _resume(self) -> None:
        found = ckpt.resolve_resume(self.config.resume, self.work_dir)
        if found is None:
            if self.config.resume not in (None, "auto"):
                raise ckpt.CheckpointError(f"no checkpoint at {self.config.resume}")
            return
        path, state = found
        if state["model_config"] != json.dumps(config_to_dict(self.model_config)):
            raise ckpt.CheckpointError(
                f"{path} was written for a different model; it cannot resume this run"
            )
        saved = TrainConfig.from_json(state["config"])
        if saved.global_batch != self.config.global_batch or saved.seed != self.config.seed:
            raise ckpt.CheckpointError(
                f"{path} used global batch {saved.global_batch} and seed {saved.seed}; resume "
                "with the same --batch-size × --world-size and --seed"
            )
        self._warn_replanned_schedule(saved, path, state["step"])
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._load_scaler(state["scaler"], path)
        self.epoch, self.batch_in_epoch, self.step = state["epoch"], state["batch"], state["step"]
        self.best_top1 = state["best_top1"]
        rngs = state["rng"]
        if len(rngs) == self.ctx.world_size:
            ckpt.set_rng_state(rngs[self.ctx.rank])
        else:
            # Same global batch, so the same steps per epoch and LR schedule, and the samples
            # already seen this epoch are the same prefix of the epoch's permutation. Only the
            # per-rank random streams (dropout) cannot carry over: reseed them per rank.
            self._seed_everything(self.config.seed + 1_000_003 * self.step + self.ctx.rank)
            self.console.print(
                f"[yellow]{path} was written by {len(rngs)} workers, this run has "
                f"{self.ctx.world_size}: continuing with the same global batch and schedule; "
                "dropout draws are reseeded, so the run is no longer bitwise-reproducible"
                "[/yellow]"
            )
        self.last_checkpoint = path
        self.metrics.truncate(self.step)
        self.console.print(f"resumed from {path} (epoch {self.epoch}, step {self.step})")

    def _warn_replanned_schedule(self, saved: TrainConfig, path: Path, step: int) -> None:
        """A cosine schedule spans ``--epochs``: resuming with another count re-plans it."""
        c = self.config
        if c.schedule != "cosine" or saved.schedule != "cosine" or saved.epochs == c.epochs:
            return
        was = c.effective_lr * lr_factor(saved, step, self.iters_per_epoch)
        now = c.effective_lr * lr_factor(c, step, self.iters_per_epoch)
        self.console.print(
            f"[yellow]{path} was trained for a {saved.epochs}-epoch cosine schedule; with "
            f"--epochs {c.epochs} the schedule is re-planned: the lr at this step goes from "
            f"{was:.4g} to {now:.4g}. Resume with --epochs {saved.epochs} to keep it[/yellow]"
        )

    def _load_scaler(self, saved: dict[str, Any], path: Path) -> None:
        """Restore the loss scale; a run that switches fp16 AMP on or off starts afresh."""
        if bool(saved) == self.scaler.is_enabled():
            if "dynamic" in self.scaler.state_dict() and "dynamic" not in saved:
                # torch_npu's scaler also saves whether it is dynamic; torch's always is
                saved = {**saved, "dynamic": True}
            self.scaler.load_state_dict(saved)
            return
        now = "uses" if self.scaler.is_enabled() else "does not use"
        self.console.print(
            f"[yellow]{path} was {'not ' if not saved else ''}saved with fp16 loss scaling and "
            f"this run {now} it: the loss scale starts afresh[/yellow]"
        )

    # ---------------------------------------------------------------- running
    def run(self) -> dict[str, Any]:
        self._resume()
        if self.last_checkpoint is None:
            self.metrics.truncate(0)  # a fresh run starts a fresh log
        self._announce()
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        if in_main_thread:
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._on_stop_signal)
        tb = _tensorboard(self.work_dir) if self.ctx.is_main else None
        self.metrics.tensorboard = tb
        start = (self.epoch, self.batch_in_epoch)
        try:
            while self.epoch < self.config.epochs:
                self._train_epoch()
                done = self.epoch + 1
                if self.val_samples and (
                    done % self.config.val_every == 0 or done == self.config.epochs
                ):
                    self.validate()
                self.epoch, self.batch_in_epoch = done, 0
                if done % self.config.save_every == 0 or done == self.config.epochs:
                    self.save_checkpoint()
        except TrainingInterrupted:
            self.save_checkpoint()
            self._export("last.safetensors")
            barrier(self.ctx)  # no rank leaves while rank 0 still writes
            raise TrainingInterrupted(
                f"interrupted ({self.stop_signal}) at step {self.step}; checkpoint "
                f"{self.last_checkpoint} written — "
                f"continue with --resume auto --work-dir {self.work_dir}"
            ) from None
        finally:
            if in_main_thread:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
            if tb is not None:
                tb.close()
            if self.ctx.is_main:
                plot_curves(self.metrics, self.work_dir / "curves.png")
        last = self._export("last.safetensors")
        summary = {
            "rank": self.ctx.rank,  # under torchrun every process gets its own summary
            "work_dir": str(self.work_dir),
            "epochs": self.config.epochs,
            "steps": self.step,
            "resumed_from": list(start),
            "best_top1": self.best_top1 if self.best_top1 >= 0 else None,
            "last_val": self.metrics.last("val"),
            "last_train": self.metrics.last("train"),
            "last_weights": str(last),
            "best_weights": str(self.work_dir / "best.safetensors")
            if self.best_top1 >= 0
            else None,
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "skipped_videos": self.train_set.num_skipped + self.val_set.num_skipped,
        }
        if self.ctx.is_main:
            with atomic_path(self.work_dir / "summary.json") as tmp:
                tmp.write_text(json.dumps(summary, indent=2))
        return summary

    def _announce(self) -> None:
        """Rank 0 writes ``config.json`` (everything the run was started with) and says what
        it trains, where and how."""
        if not self.ctx.is_main:
            return
        c, amp = self.config, self.amp_dtype if self.config.amp else None
        record = {
            "train": json.loads(c.to_json()),
            "model": config_to_dict(self.model_config),
            "labels": list(self.labels),
            "devices": f"{self.ctx.world_size} x {self.ctx.device.type}",
            "global_batch": c.global_batch,
            "effective_lr": c.effective_lr,
            "amp_dtype": str(amp).removeprefix("torch.") if amp else None,
            "steps_per_epoch": self.iters_per_epoch,
        }
        with atomic_path(self.work_dir / "config.json") as tmp:
            tmp.write_text(json.dumps(record, indent=2), encoding="utf-8")
        changes = ", ".join(f"{k}={json.dumps(v)}" for k, v in c.model_overrides)
        model = c.init or (f"{c.preset} ({changes})" if changes else c.preset)
        self.console.print(
            f"training {model}, {len(self.labels)} classes, on {record['devices']}: "
            f"global batch {c.global_batch}, lr {c.effective_lr:.4g}, "
            f"amp {record['amp_dtype'] or 'off'}, {self.iters_per_epoch} steps x {c.epochs} epochs",
            highlight=False,
        )

    def _on_stop_signal(self, signum: int, _frame: Any) -> None:
        """Ctrl-C or SIGTERM (torchrun's shutdown, a scheduler's preemption): finish the
        step, save, stop."""
        self.stop_requested = True
        self.stop_signal = signal.Signals(signum).name

    def _train_epoch(self) -> None:
        c, ctx = self.config, self.ctx
        if self.batch_in_epoch >= self.iters_per_epoch:
            return
        self.sampler.set_epoch(self.epoch)
        self.sampler.start = self.batch_in_epoch * c.batch_size
        self.model.train()
        if self.train_loader is None:  # built once: its worker processes persist across epochs
            self.train_loader = self._loader(self.train_set, self.sampler, train=True)
        loader = self._guard_loader(lambda: iter(self.train_loader))
        progress = self._progress()
        task = progress.add_task(
            f"epoch {self.epoch + 1}/{c.epochs}", total=self.iters_per_epoch, info=""
        )
        progress.update(task, completed=self.batch_in_epoch)
        window = _Window()
        with progress:
            while self.batch_in_epoch < self.iters_per_epoch:
                if self.stop_requested and not ctx.distributed:
                    raise TrainingInterrupted
                tic = time.perf_counter()
                try:
                    batch = self._guard_loader(lambda: next(loader)) if loader is not None else None
                except StopIteration:
                    break
                if ctx.distributed and self._any_rank_stops():
                    raise TrainingInterrupted  # before the forward pass: a clean step boundary
                waited = time.perf_counter() - tic
                lr = self.optimizer.param_groups[0]["lr"]
                loss = self._step(batch)
                self.batch_in_epoch += 1
                self.step += 1
                window.add(time.perf_counter() - tic, waited, loss, c.global_batch)
                progress.update(task, advance=1, info=window.describe(lr, self._eta(window)))
                if self.step % c.log_every == 0 or self.batch_in_epoch == self.iters_per_epoch:
                    scale = (
                        {"loss_scale": self.scaler.get_scale()} if self.scaler.is_enabled() else {}
                    )
                    self.metrics.write(
                        "train", self.epoch, self.step, **window.summary(lr), **scale
                    )
                    if not self.console.is_terminal:
                        line = window.describe(lr, self._eta(window))
                        self.console.print(f"epoch {self.epoch + 1} step {self.step}: {line}")
                    window = _Window()
                if self.hook is not None:
                    self.hook("step", ctx, {"step": self.step, "epoch": self.epoch, "loss": loss})
                if c.save_every_steps and self.step % c.save_every_steps == 0:
                    self.save_checkpoint()

    def _guard_loader(self, call: Callable[[], Any]) -> Any:
        """``call()`` on the train loader; None when a stop was asked and its workers are gone.

        A signal to the whole process group (Ctrl-C, a scheduler's SIGTERM) also ends the
        loader's workers. One process stops here; with N ranks this rank still joins the
        ranks' stop agreement (``_any_rank_stops``), so no rank waits on a collective alone.
        """
        try:
            return call()
        except RuntimeError:
            if not self.stop_requested:
                raise
            if not self.ctx.distributed:
                raise TrainingInterrupted from None
            return None

    def _any_rank_stops(self) -> bool:
        """Whether any rank was asked to stop (Ctrl-C, SIGTERM), agreed by all ranks.

        Asked before each step's forward pass, so a signal that arrives mid-step lets the
        step finish and every rank stops at the same step boundary, even one whose loader
        workers the signal already ended.
        """
        (stops,) = all_reduce_sum([float(self.stop_requested)], self.ctx)
        return stops > 0

    def _step(self, batch: Any) -> float:
        """One optimiser step; returns the all-rank mean loss.

        A NaN/inf loss raises before the weights change.
        """
        c, ctx = self.config, self.ctx
        if batch is None:
            raise TrainingError(f"every video of the batch at step {self.step + 1} was unreadable")
        clips, labels = batch
        views = clips.shape[1]
        clips = clips.flatten(0, 1).to(ctx.device, non_blocking=True)
        clips = clips.contiguous(memory_format=self.memory_format)
        labels = labels.repeat_interleave(views).to(ctx.device, non_blocking=True)
        with torch.autocast(ctx.device.type, dtype=self.amp_dtype, enabled=c.amp):
            logits = self.model(clips)
        loss = F.cross_entropy(logits.float(), labels)
        value = loss.item()
        if ctx.distributed:
            total, bad = all_reduce_sum([value, float(not math.isfinite(value))], ctx)
            value, finite = total / ctx.world_size, bad == 0
        else:
            finite = math.isfinite(value)
        if not finite:
            kept = (
                f"last good checkpoint: {self.last_checkpoint}"
                if self.last_checkpoint
                else "no checkpoint was saved yet"
            )
            raise LossDiverged(
                f"loss became {value} at step {self.step + 1} (epoch {self.epoch + 1}, iteration "
                f"{self.batch_in_epoch + 1}); stopped without updating the weights; {kept}. "
                "Lower --lr, keep --grad-clip on, or check the data"
            )
        self.scaler.scale(loss).backward()
        if c.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # the scaler skips the optimiser step when fp16 gradients overflow; the schedule
            # still advances per iteration (as in mmengine), which torch would warn about
            warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()`"))
            self.scheduler.step()
        return value

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Top-1/top-5/loss over the whole val list, summed over ranks (same on every rank)."""
        ctx = self.ctx
        self.model.eval()
        self.val_set.set_epoch(0)
        sums = [0.0, 0.0, 0.0, 0.0]  # loss, top1, top5, count
        loader = self._loader(self.val_set, ShardSampler(len(self.val_set), ctx), train=False)
        for batch in loader:
            if batch is None:
                continue
            clips, labels = batch
            clips, labels = clips.to(ctx.device), labels.to(ctx.device)
            with torch.autocast(ctx.device.type, dtype=self.amp_dtype, enabled=self.config.amp):
                logits = self.raw_model(clips).float()
            scores = logits.softmax(-1).mean(1)  # average the views' probabilities
            top = scores.topk(min(5, scores.shape[1]), dim=1).indices
            hits = top == labels[:, None]
            sums[0] += float(F.nll_loss(scores.clamp_min(1e-12).log(), labels, reduction="sum"))
            sums[1] += float(hits[:, 0].sum())
            sums[2] += float(hits.any(1).sum())
            sums[3] += labels.numel()
        loss, top1, top5, count = all_reduce_sum(sums, ctx)
        self.model.train()
        if count == 0:
            raise TrainingError("no validation video could be read")
        metrics = {"top1": top1 / count, "top5": top5 / count, "loss": loss / count, "count": count}
        self.metrics.write("val", self.epoch, self.step, **metrics)
        self.console.print(
            f"epoch {self.epoch + 1} val: top-1 {metrics['top1']:.2%}  top-5 {metrics['top5']:.2%}"
            f"  loss {metrics['loss']:.4f}  ({int(count)} videos)"
        )
        if metrics["top1"] > self.best_top1:
            self.best_top1 = metrics["top1"]
            self._export("best.safetensors")
        if self.ctx.is_main:
            plot_curves(self.metrics, self.work_dir / "curves.png")
        if self.hook is not None:
            self.hook("val", ctx, metrics)
        return metrics

    def _export(self, name: str) -> Path:
        """The current weights as a project .safetensors file for ``i3d predict`` (rank 0)."""
        path = self.work_dir / name
        if self.ctx.is_main:
            notes = f"trained by i3d train: epoch {self.epoch}, step {self.step}"
            info = WeightsInfo(
                config=self.model_config,
                labels=self.labels,
                preprocessing=self.preprocessing,
                provenance=Provenance(source_name=self.config.init, notes=notes),
            )
            save_weights(path, self.raw_model.state_dict(), info)
        return path

    def _progress(self) -> Progress:
        return (
            Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                console=self.console,
                disable=not self.ctx.is_main or not self.console.is_terminal,
                transient=False,
            )
            if self.ctx.is_main
            else Progress(disable=True)
        )

    def _eta(self, window: _Window) -> float:
        left = self.config.epochs * self.iters_per_epoch - self.step
        return left * window.step_time()


class _Window:
    """Running totals between two log lines."""

    def __init__(self) -> None:
        self.steps, self.time, self.wait, self.loss, self.clips = 0, 0.0, 0.0, 0.0, 0

    def add(self, seconds: float, waited: float, loss: float, clips: int) -> None:
        self.steps += 1
        self.time += seconds
        self.wait += waited
        self.loss += loss
        self.clips += clips

    def step_time(self) -> float:
        return self.time / max(self.steps, 1)

    def summary(self, lr: float) -> dict[str, float]:
        return {
            "loss": self.loss / max(self.steps, 1),
            "lr": lr,
            "clips_per_s": self.clips / max(self.time, 1e-9),
            "data_wait": self.wait / max(self.time, 1e-9),
            "step_time": self.step_time(),
        }

    def describe(self, lr: float, eta: float) -> str:
        s = self.summary(lr)
        return (
            f"loss {s['loss']:.4f}  lr {lr:.2e}  {s['clips_per_s']:.1f} clips/s  "
            f"wait {s['data_wait']:.0%}  ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}"
        )


def _tensorboard(work_dir: Path) -> Any:
    """A TensorBoard writer when the tensorboard package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(work_dir / "tensorboard"))
