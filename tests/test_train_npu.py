"""Training on NPU against a FAKE ``torch.npu``: RNG state in checkpoints, resuming a cuda/cpu
loss scaler with torch_npu's scaler, and bf16 refused where the NPU has none."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from i3d.models.config import ConfigError
from i3d.train import checkpoint as ckpt
from i3d.train.loop import Trainer, amp_dtype


class _FakeNpuModule:
    """The parts of ``torch.npu`` that training touches."""

    def __init__(self, bf16: bool = True) -> None:
        self.bf16 = bf16
        self.rng = [torch.tensor([1, 2, 3], dtype=torch.uint8)]
        self.restored: list[object] = []

    def is_available(self) -> bool:
        return True

    def is_bf16_supported(self) -> bool:
        return self.bf16

    def get_rng_state_all(self) -> list[torch.Tensor]:
        return [t.clone() for t in self.rng]

    def set_rng_state_all(self, states: list[torch.Tensor]) -> None:
        self.restored.append(states)


def test_checkpoints_keep_the_npu_generators(monkeypatch):
    fake = _FakeNpuModule()
    monkeypatch.setattr(torch, "npu", fake, raising=False)
    state = ckpt.rng_state()
    assert torch.equal(state["npu"][0], fake.rng[0])
    ckpt.set_rng_state(state)
    assert len(fake.restored) == 1 and torch.equal(fake.restored[0][0], fake.rng[0])


class _NpuScaler:
    """torch_npu's GradScaler as far as checkpoints go: its state has (and needs) ``dynamic``."""

    def __init__(self) -> None:
        self.loaded: dict[str, object] = {}

    def is_enabled(self) -> bool:
        return True

    def state_dict(self) -> dict[str, object]:
        return {"scale": 65536.0, "dynamic": True}

    def load_state_dict(self, state: dict[str, object]) -> None:
        if state["dynamic"]:  # KeyError: 'dynamic' on a torch (cuda/cpu) scaler's state
            self.loaded = dict(state)


def test_a_cuda_or_cpu_fp16_scaler_resumes_on_torch_npus_scaler():
    saved = torch.amp.GradScaler("cpu", init_scale=1024.0).state_dict()
    assert "dynamic" not in saved
    trainer = types.SimpleNamespace(scaler=_NpuScaler(), console=None)
    Trainer._load_scaler(trainer, saved, Path("epoch1.pt"))
    assert trainer.scaler.loaded["scale"] == 1024.0 and trainer.scaler.loaded["dynamic"] is True


def test_bf16_is_refused_on_an_npu_without_it(monkeypatch):
    fake = _FakeNpuModule(bf16=False)
    monkeypatch.setattr(torch, "npu", fake, raising=False)
    npu = types.SimpleNamespace(type="npu", index=0)
    with pytest.raises(ConfigError, match=r"no bf16 .*silently train without autocast; use"):
        amp_dtype(npu, "bf16")
    assert amp_dtype(npu) == torch.float16
    fake.bf16 = True
    assert amp_dtype(npu, "bf16") == torch.bfloat16
