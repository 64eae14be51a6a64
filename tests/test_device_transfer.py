"""uint8 views to the model's device: normalised there, copied a piece ahead, results unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tinymodel import save_tiny_weights
from videogen import write_video

from i3d.data import transforms as T
from i3d.data.datasets import finish_pieces
from i3d.data.pipeline import ViewPiece
from i3d.data.transfer import DeviceFeed, Staged, pins_memory
from i3d.inference import Predictor
from i3d.weights.preprocessing import DEEPMIND_K400, MMACTION_K400


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    weights = save_tiny_weights(root / "tiny.safetensors", ("a", "b", "c"), num_crops=3)
    video = write_video(root / "v.mp4", 12, width=48, height=32)
    return Predictor(weights, batch_size=2), video


def _views(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (4, 3, 8, 32, 32), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))  # fmt: skip


@pytest.mark.parametrize("prep", [MMACTION_K400, DEEPMIND_K400])
def test_normalising_where_the_views_are_is_bit_identical_to_the_host(predictor, prep):
    # the same float32 ops in the same order (no fusion, IEEE mul/add/sub/div): on the CPU
    # the "device" path is bit for bit what the host path gave before uint8 went to the runner
    pred, _ = predictor
    views = _views()
    host = T.normalize(views, prep.mean, prep.std, prep.value_range)
    runner = pred.runner
    with torch.no_grad():
        before = runner.predict(host[None])[0]
    after = runner.logits_on_device(views, pred.pipeline.normalize).cpu()
    if prep is MMACTION_K400:  # the tiny weights' own normalisation
        assert torch.equal(after, before)
        assert torch.equal(runner.predict(views), before)  # uint8 through predict: on device
    assert torch.equal(T.normalize(views.clone(), prep.mean, prep.std, prep.value_range), host)


def test_the_predictor_hands_the_torch_runner_uint8(predictor, monkeypatch):
    pred, video = predictor
    expected = pred.scores(video)
    seen = []
    run = pred.runner.logits_on_device

    def spy(clips, prepare=None):
        seen.append(clips.dtype)
        return run(clips, prepare)

    monkeypatch.setattr(pred.runner, "logits_on_device", spy)
    got = pred.scores(video)
    assert seen and set(seen) == {torch.uint8}
    np.testing.assert_array_equal(got, expected)


class _Recorded(DeviceFeed):
    """A feed that logs when each piece's copy starts and when it is handed out."""

    def __init__(self) -> None:
        super().__init__("cpu")
        self.log: list[str] = []

    @property
    def overlaps(self) -> bool:  # as a cuda/npu feed, whose streams only a device can test
        return True

    def start(self, host: torch.Tensor) -> Staged:
        self.log.append(f"copy {int(host[0, 0, 0, 0, 0])}")
        return super().start(host)

    def take(self, staged: Staged) -> torch.Tensor:
        self.log.append(f"take {int(staged.tensor[0, 0, 0, 0, 0])}")
        return super().take(staged)


def _piece(n: int, last: bool = False) -> ViewPiece:
    views = torch.full((1, 3, 1, 1, 1), n, dtype=torch.uint8)
    return ViewPiece(views, n, n + 1, n + 1 if last else 9, 1)


def test_the_next_piece_is_copied_before_the_current_one_is_handed_out():
    feed = _Recorded()
    items = [(0, _piece(0)), (0, "bad video"), (1, _piece(1)), (1, _piece(2))]
    out = []
    for index, piece in feed.ahead(items):
        out.append((index, piece))
        feed.log.append(f"run {index}")
    assert feed.log == [
        "copy 0", "copy 1", "take 0", "run 0", "run 0", "copy 2", "take 1", "run 1", "take 2",
        "run 1",
    ]  # fmt: skip
    assert [i for i, _ in out] == [0, 0, 1, 1] and out[1][1] == "bad video"
    assert not DeviceFeed("cpu").overlaps and not pins_memory("cpu") and pins_memory("cuda:1")
    plain = [(i, p) for i, p in DeviceFeed("cpu").ahead(items)]  # no side stream: no holding
    assert [p if isinstance(p, str) else p.start for _, p in plain] == [0, "bad video", 1, 2]


def test_a_video_is_finished_only_after_the_next_piece_is_queued():
    # a run that queues device work without waiting keeps the device busy while finish waits
    log: list[str] = []
    pieces = [(0, _piece(0, last=True)), (1, _piece(0)), (1, _piece(1, last=True))]

    def run(piece: ViewPiece) -> torch.Tensor:
        log.append(f"run {piece.start}")
        return torch.zeros(1, 2)

    def finish(out: torch.Tensor) -> int:
        log.append("finish")
        return len(out)

    results = list(finish_pieces(pieces, run, finish, (ValueError,)))
    assert log == ["run 0", "run 0", "finish", "run 1", "finish"]
    assert results == [(0, 1), (1, 2)]


def test_a_finished_video_still_comes_out_when_the_next_piece_is_interrupted():
    pieces = [(0, _piece(0, last=True)), (1, _piece(0, last=True))]

    def run(piece: ViewPiece) -> torch.Tensor:
        if run.calls:
            raise KeyboardInterrupt
        run.calls += 1
        return torch.zeros(1, 2)

    run.calls = 0
    got = []
    with pytest.raises(KeyboardInterrupt):
        for result in finish_pieces(pieces, run, len, (ValueError,)):
            got.append(result)
    assert got == [(0, 1)]
