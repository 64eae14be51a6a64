"""Training-loop overhead: ``i3d train``'s step vs a minimal hand-written PyTorch loop.

Both loops train the same model on the same data in this run and the ratios are printed:
1. step only — identical in-memory batches through ``Trainer._step`` and through a bare
   forward / cross-entropy / backward / clip / SGD / LR-step loop (target ratio <= 1.05);
2. end to end — whole epochs from the video files with ``--workers`` loader processes,
   ``i3d.train.train`` vs the bare loop over an identical DataLoader; prints the data-wait share.

    python benchmarks/train_step.py --data /tmp/toy   # made by `i3d make-toy-dataset`
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from i3d.distributed import DistContext
from i3d.models import build_model
from i3d.train import TrainConfig, train
from i3d.train.loop import Trainer
from i3d.train.schedule import build_scheduler


def bare_step(model, optimizer, scheduler, batch, grad_clip):
    clips, labels = batch
    clips = clips.flatten(0, 1)
    loss = F.cross_entropy(model(clips), labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return loss


def bare_setup(trainer: Trainer):
    model = build_model(trainer.model_config).train()
    c = trainer.config
    opt = torch.optim.SGD(
        model.parameters(), lr=c.effective_lr, momentum=c.momentum, weight_decay=c.weight_decay
    )
    return model, opt, build_scheduler(opt, c, trainer.iters_per_epoch)


def timed(fn, batches) -> float:
    tic = time.perf_counter()
    for batch in batches:
        fn(batch)
    return (time.perf_counter() - tic) / len(batches)


def step_only(config: TrainConfig, steps: int, rounds: int) -> tuple[float, float]:
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = Trainer(config, DistContext())
    loader = trainer._loader(trainer.train_set, trainer.sampler, train=True)
    batches = [b for _, b in zip(range(steps), loader, strict=False)]
    model, opt, sched = bare_setup(trainer)
    ours, bare = [], []
    timed(trainer._step, batches[:2])  # warm-up both
    timed(lambda b: bare_step(model, opt, sched, b, config.grad_clip), batches[:2])
    for _ in range(rounds):
        ours.append(timed(trainer._step, batches))
        bare.append(timed(lambda b: bare_step(model, opt, sched, b, config.grad_clip), batches))
    return statistics.median(ours), statistics.median(bare)


def end_to_end(config: TrainConfig) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        cfg = TrainConfig(**{**json.loads(config.to_json()), "work_dir": tmp})
        train(cfg)
        rows = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if r["kind"] == "train"]
        ours = statistics.mean(r["step_time"] for r in rows)  # per step, data wait included
        wait = statistics.mean(r["data_wait"] for r in rows)
        trainer = Trainer(cfg, DistContext())
    model, opt, sched = bare_setup(trainer)
    tic, steps = time.perf_counter(), 0
    for epoch in range(cfg.epochs):
        trainer.sampler.set_epoch(epoch)
        trainer.train_set.set_epoch(epoch)
        for batch in trainer._loader(trainer.train_set, trainer.sampler, train=True):
            bare_step(model, opt, sched, batch, cfg.grad_clip)
            steps += 1
    return ours, (time.perf_counter() - tic) / steps, wait


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="toy dataset folder")
    parser.add_argument("--depth", type=int, default=18)
    parser.add_argument("--base-channels", type=int, default=8)
    parser.add_argument("--clip-len", type=int, default=16)
    parser.add_argument("--size", type=int, default=56)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = TrainConfig(
        train_list=str(args.data / "train.txt"),
        data_root=str(args.data),
        model_overrides={"depth": args.depth, "base_channels": args.base_channels},
        clip_len=args.clip_len,
        frame_interval=1,
        resize_short=round(args.size * 8 / 7),
        input_size=args.size,
        batch_size=args.batch_size,
        workers=args.workers,
        epochs=args.epochs,
        save_every=args.epochs,
        log_every=10,
        lr=0.05,
        scale_lr=False,
    )
    ours, bare = step_only(config, args.steps, args.rounds)
    print(
        f"step only   : i3d {ours * 1e3:7.1f} ms/step   bare {bare * 1e3:7.1f} ms/step   "
        f"ratio {ours / bare:.3f}"
    )
    ours, bare, wait = end_to_end(config)
    print(
        f"end to end  : i3d {ours * 1e3:7.1f} ms/step   bare {bare * 1e3:7.1f} ms/step   "
        f"ratio {ours / bare:.3f}   data-wait {wait:.1%} ({args.workers} workers)"
    )


if __name__ == "__main__":
    main()
