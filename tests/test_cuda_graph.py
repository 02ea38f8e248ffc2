"""The replay-vs-eager check of the CUDA-graph power iteration (pure tensor math: runs on CPU)."""

import torch

from torchgloro._cuda_graph import iterates_agree


def test_tf32_level_noise_agrees():
    g = torch.Generator().manual_seed(0)
    eager = torch.randn(1, 32, 14, 14, generator=g)
    noisy = eager * (1 + 1e-3 * torch.randn(eager.shape, generator=g))  # TF32: ~10 mantissa bits
    assert iterates_agree(noisy, eager)


def test_stale_or_partial_replay_disagrees():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 64, generator=g)
    u0 = torch.randn(64, generator=g)
    u0 /= u0.norm()

    def iterate(u, n):
        for _ in range(n):
            u = w.T @ (w @ u)
            u = u / u.norm()
        return u

    eager = iterate(u0, 4)
    assert iterates_agree(iterate(u0, 4), eager)
    assert not iterates_agree(iterate(u0, 3), eager)  # a skipped iteration
    assert not iterates_agree(u0, eager)  # replay that did nothing
    assert not iterates_agree(torch.zeros(64), eager)  # read freed (zeroed) memory
