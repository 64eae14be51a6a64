"""Training throughput (clips/s) on one device or many: ``i3d train``'s step vs a bare loop.

The issue's GPU figures: ``i3d_r50_nl_dot_product`` at 32×224², batch 8 per device, AMP (the
seeds report 20.68 clips/s on one V100 and 74.84 on eight). Data loading is left out (random
clips already in memory) so the number is the model + optimiser step; both loops run in the
same processes on the same inputs. Several devices run through torch.distributed DDP, either
spawned here (``--world-size N``) or under torchrun; clips/s counts every device's clips.

    python benchmarks/train_throughput.py --device cuda --amp                  # one GPU
    python benchmarks/train_throughput.py --device cuda --amp --world-size 8   # eight GPUs
    python benchmarks/train_throughput.py --device cpu --base-channels 8 --clip-len 8 --size 64
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from i3d.data.toy import ToySpec, make_toy_dataset
from i3d.distributed import DistContext, barrier, launch
from i3d.models import build_model
from i3d.train import TrainConfig
from i3d.train.loop import Trainer, amp_dtype, grad_scaler
from i3d.train.schedule import build_scheduler

SEEDS_CLIPS_PER_S = {1: 20.68, 8: 74.84}  # V100s, mmaction2 I3D NL-R50 32x2x1, AMP


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step, batches, ctx: DistContext, warmup: int) -> float:
    """Clips per second of ``step`` over ``batches``, all ranks together, after a warm-up."""
    for batch in batches[:warmup]:
        step(batch)
    synchronize(ctx.device)
    barrier(ctx)
    tic = time.perf_counter()
    for batch in batches[warmup:]:
        step(batch)
    synchronize(ctx.device)
    barrier(ctx)
    clips = sum(b[0].shape[0] for b in batches[warmup:]) * ctx.world_size
    return clips / (time.perf_counter() - tic)


def bench(ctx: DistContext, args: argparse.Namespace) -> dict[str, Any] | None:
    """One rank: the trainer's step, then a bare DDP loop over the same batches (rank 0's
    result; None on the other ranks)."""
    overrides = {"base_channels": args.base_channels} if args.base_channels else {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        toy = Path(tmp) / "toy"  # only so a Trainer can be built; the clips below are random
        per_class = args.batch_size * ctx.world_size  # one batch for every rank
        make_toy_dataset(toy, ToySpec(classes=2, videos_per_class=per_class, frames=4))
        config = TrainConfig(
            train_list=str(toy / "train.txt"),
            data_root=str(toy),
            preset=args.preset,
            model_overrides=overrides,
            clip_len=args.clip_len,
            input_size=args.size,
            batch_size=args.batch_size,
            backend=args.device,
            world_size=ctx.world_size,
            amp=args.amp,
            work_dir=str(Path(tmp) / "work"),
        )
        trainer = Trainer(config, ctx)
    generator = torch.Generator().manual_seed(ctx.rank)
    shape = (args.batch_size, 1, 3, args.clip_len, args.size, args.size)
    batches = [
        (torch.randn(shape, generator=generator), torch.randint(0, 2, (args.batch_size,)))
        for _ in range(args.warmup + args.steps)
    ]
    ours = measure(trainer._step, batches, ctx, args.warmup)
    arch = trainer.model_config
    del trainer

    model: nn.Module = build_model(arch).to(ctx.device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    if ctx.distributed:
        ids = None if ctx.device.type == "cpu" else [ctx.device.index]
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    sched = build_scheduler(opt, config, 100)
    dtype = amp_dtype(ctx.device)
    scaler = grad_scaler(ctx.device, args.amp and dtype == torch.float16)

    def bare(batch):
        clips, labels = (t.to(ctx.device, non_blocking=True) for t in batch)
        with torch.autocast(ctx.device.type, dtype=dtype, enabled=args.amp):
            loss = nn.functional.cross_entropy(model(clips.flatten(0, 1)).float(), labels)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), 40.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sched.step()
        return loss.item()

    base = measure(bare, batches, ctx, args.warmup)
    name = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"
    if not ctx.is_main:
        return None
    return {
        "ours": ours,
        "bare": base,
        "device": name,
        "world": ctx.world_size,
        "custom": overrides,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda", "npu"])
    parser.add_argument("--world-size", type=int, default=1, help="devices (ignored by torchrun)")
    parser.add_argument("--preset", default="i3d_r50_nl_dot_product")
    parser.add_argument("--base-channels", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8, help="clips per device")
    parser.add_argument("--clip-len", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    result = launch(bench, args, backend=args.device, world_size=args.world_size)
    if result is None:  # a torchrun rank other than 0
        return
    world = result["world"]
    print(
        f"{args.preset} {args.clip_len}x{args.size}², batch {args.batch_size} per device, "
        f"amp={args.amp}, {world} x {result['device']}"
    )
    print(f"  i3d train step : {result['ours']:8.2f} clips/s")
    ratio = result["ours"] / result["bare"]
    print(f"  bare DDP loop  : {result['bare']:8.2f} clips/s   (i3d / bare = {ratio:.3f})")
    setting = (args.preset, args.clip_len, args.size, args.batch_size, args.amp)
    seeds = SEEDS_CLIPS_PER_S.get(world)
    if setting == ("i3d_r50_nl_dot_product", 32, 224, 8, True) and not result["custom"] and seeds:
        print(
            f"  seeds, {world}x V100 : {seeds:8.2f} clips/s   (i3d / V100 = "
            f"{result['ours'] / seeds:.2f})"
        )


if __name__ == "__main__":
    main()
