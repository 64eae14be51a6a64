"""Training throughput (clips/s) of one device on in-memory clips: ``i3d train``'s step vs bare.

The issue's GPU figure: ``i3d_r50_nl_dot_product`` at 32×224², batch 8, AMP (the seeds report
20.68 clips/s on one V100). Data loading is left out (random clips already on the device) so
the number is the model + optimiser step; both loops run in this process on the same inputs.

    python benchmarks/train_throughput.py --device cuda --amp           # the GPU figure
    python benchmarks/train_throughput.py --device cpu --base-channels 8 --clip-len 8 --size 64
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

import torch

from i3d.data.toy import ToySpec, make_toy_dataset
from i3d.models import build_model
from i3d.train import TrainConfig
from i3d.train.distributed import DistContext, device_for
from i3d.train.loop import Trainer
from i3d.train.schedule import build_scheduler

SEEDS_V100_CLIPS_PER_S = 20.68


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step, batches, device: torch.device, warmup: int) -> float:
    """Clips per second of ``step`` over ``batches`` after ``warmup`` untimed steps."""
    for batch in batches[:warmup]:
        step(batch)
    synchronize(device)
    tic = time.perf_counter()
    for batch in batches[warmup:]:
        step(batch)
    synchronize(device)
    clips = sum(b[0].shape[0] for b in batches[warmup:])
    return clips / (time.perf_counter() - tic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--preset", default="i3d_r50_nl_dot_product")
    parser.add_argument("--base-channels", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--clip-len", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    device = device_for(args.device, 0)
    overrides = {"base_channels": args.base_channels} if args.base_channels else {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        toy = Path(tmp) / "toy"  # only so a Trainer can be built; the clips below are random
        make_toy_dataset(toy, ToySpec(classes=2, videos_per_class=args.batch_size, frames=4))
        config = TrainConfig(
            train_list=str(toy / "train.txt"),
            data_root=str(toy),
            preset=args.preset,
            model_overrides=overrides,
            clip_len=args.clip_len,
            input_size=args.size,
            batch_size=args.batch_size,
            backend=args.device,
            amp=args.amp,
            work_dir=str(Path(tmp) / "work"),
        )
        trainer = Trainer(config, DistContext(device=device))
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch_size, 1, 3, args.clip_len, args.size, args.size)
    batches = [
        (torch.randn(shape, generator=generator), torch.randint(0, 2, (args.batch_size,)))
        for _ in range(args.warmup + args.steps)
    ]
    ours = measure(trainer._step, batches, device, args.warmup)

    model = build_model(trainer.model_config).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    sched = build_scheduler(opt, config, trainer.iters_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    def bare(batch):
        clips, labels = (t.to(device, non_blocking=True) for t in batch)
        with torch.autocast(device.type, dtype=dtype, enabled=args.amp):
            loss = torch.nn.functional.cross_entropy(model(clips.flatten(0, 1)).float(), labels)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 40.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sched.step()
        return loss.item()

    base = measure(bare, batches, device, args.warmup)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"{args.preset} {args.clip_len}x{args.size}², batch {args.batch_size}, "
        f"amp={args.amp}, {name}"
    )
    print(f"  i3d train step : {ours:8.2f} clips/s")
    print(f"  bare loop      : {base:8.2f} clips/s   (i3d / bare = {ours / base:.3f})")
    seeds_setting = (args.preset, args.clip_len, args.size, args.batch_size, args.amp)
    if seeds_setting == ("i3d_r50_nl_dot_product", 32, 224, 8, True) and not overrides:
        ratio = ours / SEEDS_V100_CLIPS_PER_S
        print(
            f"  seeds, 1x V100 : {SEEDS_V100_CLIPS_PER_S:8.2f} clips/s   (i3d / V100 = {ratio:.2f})"
        )


if __name__ == "__main__":
    main()
