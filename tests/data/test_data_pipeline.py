"""DeviceBatches (epoch coverage, reproducibility, DDP sharding) and Augment."""

from __future__ import annotations

import pytest
import torch

from torchgloro._errors import GloroInputError
from torchgloro.data import Augment, DatasetInfo, DeviceBatches, Split

INFO = DatasetInfo("toy", tuple("abc"), (1, 2, 2), 0.1)


def toy(n: int = 23) -> Split:
    # x encodes the sample index so batches can be traced back to samples
    x = torch.arange(n, dtype=torch.float32).repeat_interleave(4).reshape(n, 1, 2, 2) / n
    return Split(x, torch.arange(n) % 3, INFO)


def ids(x: torch.Tensor, n: int) -> list[int]:
    return (x[:, 0, 0, 0] * n).round().long().tolist()


@pytest.mark.parametrize("drop_last", [False, True])
def test_epoch_covers_every_sample_once(drop_last):
    n = 23
    batches = DeviceBatches(
        toy(n), 5, shuffle=True, generator=torch.Generator().manual_seed(0), drop_last=drop_last
    )
    assert len(batches) == (4 if drop_last else 5)
    epochs = []
    for _ in range(2):
        seen = []
        for x, y in batches:
            assert x.shape[1:] == (1, 2, 2) and y.dtype == torch.int64
            seen += ids(x, n)
            assert [i % 3 for i in ids(x, n)] == y.tolist()
        assert len(seen) == (20 if drop_last else 23) and len(set(seen)) == len(seen)
        if not drop_last:
            assert sorted(seen) == list(range(n))
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # a fresh permutation each epoch
    assert epochs[0] != sorted(epochs[0])


def test_no_shuffle_is_in_order():
    b = DeviceBatches(toy(7), 3, shuffle=False, generator=None)
    assert [ids(x, 7) for x, _ in b] == [[0, 1, 2], [3, 4, 5], [6]]


def test_any_x_y_dataset_with_keyword_defaults():
    """Found by a user: a TensorDataset raised AttributeError, and shuffle and generator
    had no defaults. (Defaults as torch's DataLoader: in order.)"""
    from torch.utils.data import TensorDataset

    split = toy(7)
    expected = [ids(x, 7) for x, _ in DeviceBatches(split, 3, shuffle=False, generator=None)]
    pairs = [(split.x[i], int(split.y[i])) for i in range(7)]  # e.g. a map-style Dataset
    for data in (TensorDataset(split.x, split.y), pairs, split):
        b = DeviceBatches(data, 3)
        got = list(b)
        assert [ids(x, 7) for x, _ in got] == expected
        assert torch.equal(torch.cat([y for _, y in got]), split.y)
    tabular = TensorDataset(torch.randn(10, 5), torch.arange(10) % 2)  # not images
    assert [x.shape for x, _ in DeviceBatches(tabular, 4)][0] == (4, 5)
    assert "TensorDataset" in repr(DeviceBatches(tabular, 4, shuffle=True))
    with pytest.raises(GloroInputError, match=r"DeviceBatches takes a Split, an \(x, y\) pair"):
        DeviceBatches(object(), 4)

    class Mismatched:
        x, y = torch.zeros(3, 2), torch.zeros(2)

    with pytest.raises(GloroInputError, match="x has 3 samples but y has 2"):
        DeviceBatches(Mismatched(), 4)


def test_reproducible_with_same_seed():
    def run(seed):
        b = DeviceBatches(toy(), 4, True, torch.Generator().manual_seed(seed))
        return [ids(x, 23) for _ in range(2) for x, _ in b]

    assert run(1) == run(1)
    assert run(1) != run(2)


@pytest.mark.parametrize("n, bs", [(23, 6), (24, 6), (21, 4)])
def test_ddp_shards_concatenate_to_single_rank(n, bs):
    world = 2
    single = DeviceBatches(toy(n), bs, True, torch.Generator().manual_seed(5))
    gens = [torch.Generator().manual_seed(5) for _ in range(world)]
    ranks = [
        DeviceBatches(toy(n), bs, True, gens[r], rank=r, world_size=world) for r in range(world)
    ]
    assert len({len(r) for r in ranks}) == 1
    for _epoch in range(2):
        single_batches = [ids(x, n) for x, _ in single]
        per_rank = [[ids(x, n) for x, _ in r] for r in ranks]
        merged = [a + b for a, b in zip(*per_rank, strict=True)]
        assert merged == single_batches[: len(merged)]
        for a, b in zip(*per_rank, strict=True):
            assert a and b and abs(len(a) - len(b)) <= 1
    # every rank's generator advanced identically
    assert torch.equal(gens[0].get_state(), gens[1].get_state())


def test_ddp_tiny_tail_dropped_on_all_ranks():
    # 9 samples, global batch 4, 3 ranks: last batch has 1 < 3 samples -> dropped
    ranks = [DeviceBatches(toy(9), 4, False, None, rank=r, world_size=3) for r in range(3)]
    assert [len(r) for r in ranks] == [2, 2, 2]
    assert [ids(x, 9) for x, _ in ranks[2]] == [[3], [7]]


def test_bad_arguments():
    with pytest.raises(GloroInputError):
        DeviceBatches(toy(), 0, True, None)
    with pytest.raises(GloroInputError):
        DeviceBatches(toy(), 4, True, None, rank=2, world_size=2)
    with pytest.raises(GloroInputError):
        DeviceBatches(toy(), 1, True, None, rank=0, world_size=2)


def test_augment_applied_per_batch():
    aug = Augment()
    b = DeviceBatches(toy(8), 4, False, None, augment=aug)
    torch.manual_seed(0)
    x, _ = next(iter(b))
    assert x.shape == (4, 1, 2, 2)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 32, 32, generator=g)
    x[:, :, :, :16] = 1.0  # strongly asymmetric, so flips and shifts show
    return x


def test_augment_shape_range_changes(images):
    torch.manual_seed(0)
    out = Augment()(images)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert (out - images).abs().mean() > 0.05
    assert torch.equal(images[:, :, :, :16], torch.ones_like(images[:, :, :, :16]))  # input kept
    gray = Augment(hflip=False)(images[:, :1])
    assert gray.shape == (8, 1, 32, 32)


def test_augment_deterministic_under_manual_seed(images):
    aug = Augment()
    torch.manual_seed(123)
    a = aug(images)
    torch.manual_seed(123)
    b = aug(images)
    c = aug(images)
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_augment_generator_is_independent_of_global_rng(images):
    def run(global_seed):
        torch.manual_seed(global_seed)
        aug = Augment(generator=torch.Generator().manual_seed(7))
        out = [aug(images), aug(images)]
        return out, torch.rand(1)

    (a1, a2), r1 = run(0)
    (b1, b2), r2 = run(1)
    assert torch.equal(a1, b1) and torch.equal(a2, b2) and not torch.equal(a1, a2)
    # the global RNG was not consumed by the augmentation
    torch.manual_seed(0)
    assert torch.equal(r1, torch.rand(1))


def test_augment_bad_input():
    with pytest.raises(GloroInputError):
        Augment()(torch.rand(3, 32, 32))
    with pytest.raises(GloroInputError):
        Augment(shift=1.5)
