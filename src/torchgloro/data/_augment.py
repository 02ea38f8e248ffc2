"""Batched, on-device data augmentation (GloRo paper, Appendix B) built on kornia."""

from __future__ import annotations

import torch
from torch import nn

from torchgloro._errors import GloroInputError

__all__ = ["Augment"]


class Augment(nn.Module):
    """Random affine + horizontal flip, applied per sample to a ``(N, C, H, W)`` batch.

    Defaults follow Appendix B of the GloRo paper (Keras ``ImageDataGenerator`` terms):
    rotation up to ``rotation`` = 20 degrees, width/height shift up to ``shift`` = 0.2 of
    the image size, shear ``shear`` = 0.1 (degrees, as Keras' ``shear_range``), zoom
    ``zoom`` = 0.1 (scale in [0.9, 1.1] per axis), and a horizontal flip with probability
    0.5. Pixels shifted in from outside repeat the border (Keras' default
    ``fill_mode="nearest"``). The output is clamped to ``[0, 1]``. The paper does not
    augment MNIST; :attr:`DatasetInfo.augment_by_default` says which datasets it does.

    Randomness: kornia draws from torch's global RNG, so ``torch.manual_seed(s)`` makes a
    run reproducible. For an independent, seedable stream pass ``generator``: each call
    then draws one seed from it and runs kornia under :func:`torch.random.fork_rng` seeded
    with that, leaving the global RNG untouched.
    """

    def __init__(
        self,
        rotation: float = 20.0,
        shift: float = 0.2,
        shear: float = 0.1,
        zoom: float = 0.1,
        hflip: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        import kornia.augmentation as K

        for nm, v, hi in (("shift", shift, 1.0), ("zoom", zoom, 1.0)):
            if not 0.0 <= v < hi:
                raise GloroInputError(f"{nm} must be in [0, {hi}), got {v}")
        if rotation < 0 or shear < 0:
            raise GloroInputError("rotation and shear must be >= 0")
        self.rotation, self.shift, self.shear, self.zoom = rotation, shift, shear, zoom
        self.hflip = hflip
        self.generator = generator
        ops: list[nn.Module] = [
            K.RandomAffine(
                degrees=rotation,
                translate=(shift, shift) if shift > 0 else None,
                scale=(1 - zoom, 1 + zoom, 1 - zoom, 1 + zoom) if zoom > 0 else None,
                shear=shear if shear > 0 else None,
                padding_mode="border",
                p=1.0,
            )
        ]
        if hflip:
            ops.append(K.RandomHorizontalFlip(p=0.5))
        self.ops = nn.Sequential(*ops)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.ndim != 4:
            raise GloroInputError(f"Augment expects (N, C, H, W), got shape {tuple(x.shape)}")
        gen = generator if generator is not None else self.generator
        if gen is None:
            return self.ops(x).clamp_(0.0, 1.0)
        seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device).item())
        devices = []
        if x.is_cuda:
            idx = x.device.index
            devices = [idx if idx is not None else torch.cuda.current_device()]
        with torch.random.fork_rng(devices=devices):
            torch.random.default_generator.manual_seed(seed)
            if x.is_cuda:
                with torch.cuda.device(x.device):
                    torch.cuda.manual_seed(seed)
            return self.ops(x).clamp_(0.0, 1.0)

    def extra_repr(self) -> str:
        return (
            f"rotation={self.rotation}, shift={self.shift}, shear={self.shear}, "
            f"zoom={self.zoom}, hflip={self.hflip}"
        )
