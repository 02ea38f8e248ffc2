"""Model files are untrusted input: what :func:`torchgloro.load` checks before it builds or
trusts anything.

* The metadata is validated field by field (types, ranges, sizes) before anything is built,
  and a digest stored with it catches edited fields (``activation``, ``lipschitz``, ...).
* A model described by the metadata is first built on PyTorch's ``meta`` device (no memory):
  its tensor shapes must be the file's, and no input or layer output may exceed
  :data:`MAX_VALUES` per sample.
* The frozen fast-mode bound stored in the file is recomputed from the file's weights and
  (unit) iterates, and the file is refused if they disagree. (Sound mode never reads it: its bounds
  are proven from the weights on every use.)
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchgloro._errors import CheckpointError, GloroInputError
from torchgloro.nn.models import create_model

__all__ = [
    "FORMAT",
    "MAX_VALUES",
    "Settings",
    "build_backbone",
    "check_sizes",
    "metadata_digest",
    "read_settings",
    "verify_frozen_bound",
]

FORMAT = "torchgloro/1"
#: The most values per sample a file may ask for, in its input or any layer's output: 2^26
#: (256 MiB of float32 per sample). Tiny ImageNet's 7C1F needs about 2^20.
MAX_VALUES = 2**26
#: How far the stored frozen bound may be from the one recomputed from the file, and an
#: iterate's norm from 1 (relative): the same float32 arithmetic on another device differs by
#: rounding only.
_FROZEN_TOL = 1e-4


@dataclass(frozen=True)
class Settings:
    """The validated ``gloro`` section of a model file, and its model spec (if any)."""

    epsilon: float
    in_shape: tuple[int, ...]
    power_iterations: int
    lipschitz: str
    spec: dict[str, Any] | None


def metadata_digest(info: dict[str, Any]) -> str:
    """SHA-256 of the metadata's fields (all but the digest itself), canonical JSON."""
    body = {k: v for k, v in info.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_settings(meta: dict[str, str], path) -> Settings:
    """The file's settings, each field checked.

    Raises:
        CheckpointError: not a torchgloro file, a field missing or of the wrong type or
            range, or metadata that does not match its digest.
    """
    try:
        info = json.loads(meta["torchgloro"])
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{path} is not a torchgloro checkpoint (missing or bad 'torchgloro' metadata: {e})."
        ) from e
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a torchgloro checkpoint (format is not {FORMAT}).")
    digest = info.get("digest")
    if digest is not None and digest != metadata_digest(info):
        raise CheckpointError(
            f"{path} was modified after it was saved: its metadata does not match its digest, "
            f"so it would load another network than the one saved. Restore the original file."
        )
    g = _section(info, "gloro", path)
    number = (int, float)
    eps = _field(g, "gloro.epsilon", lambda v: type(v) in number, "a number > 0", path)
    in_shape = _shape(g.get("in_shape"), "gloro.in_shape", path)
    pi = _field(
        g, "gloro.power_iterations", lambda v: type(v) is int and 0 <= v <= 10**6,
        "an integer between 0 and 10^6", path,
    )  # fmt: skip
    lip = _field(
        g, "gloro.lipschitz", lambda v: v in ("margin", "basic"), "'margin' or 'basic'", path
    )
    spec = info.get("model")
    if spec is not None:
        spec = _section(info, "model", path)
        _field(spec, "model.name", lambda v: type(v) is str, "a model name", path)
        _field(
            spec, "model.num_classes", lambda v: type(v) is int and 2 <= v <= MAX_VALUES,
            "an integer from 2 to 2^26", path,
        )  # fmt: skip
        _shape(spec.get("in_shape"), "model.in_shape", path)
    return Settings(float(eps), in_shape, pi, lip, spec)


def build_backbone(settings: Settings, tensors: dict[str, torch.Tensor], prefix: str, path):
    """The backbone the metadata describes, built for real only after a dry run on the
    ``meta`` device showed that its tensors are the file's and its sizes are sane."""
    spec = dict(settings.spec or {})
    name, in_shape, classes = spec.pop("name"), tuple(spec.pop("in_shape")), spec.pop("num_classes")
    try:
        with torch.device("meta"):
            probe = create_model(name, in_shape, classes, **spec)
    except (GloroInputError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} has invalid model settings in its metadata: {e}") from e
    file_shapes = {k[len(prefix) :]: tuple(t.shape) for k, t in tensors.items()}
    wrong = [
        f"{k}: checkpoint {file_shapes.get('backbone.' + k)} vs model {tuple(t.shape)}"
        for k, t in probe.state_dict().items()
        if file_shapes.get("backbone." + k) != tuple(t.shape)
    ]
    if wrong:
        raise CheckpointError(
            f"{path} does not match the model its metadata describes ({'; '.join(wrong[:5])}): "
            f"the file is damaged or was modified. Restore it, or retrain."
        )
    check_sizes(probe, settings.in_shape, path)
    return create_model(name, in_shape, classes, **spec)


def check_sizes(backbone: nn.Module, in_shape: tuple[int, ...], path) -> None:
    """Raises unless the input and every layer's output have at most :data:`MAX_VALUES`
    values per sample (a dry run on a ``meta`` copy of ``backbone``: nothing is allocated;
    any model, a chain of layers or a user's own forward)."""
    if math.prod(in_shape) > MAX_VALUES:
        _too_big(math.prod(in_shape), in_shape, path)
    probe = backbone if _on_meta(backbone) else copy.deepcopy(backbone).to("meta")
    sizes: list[int] = []

    def record(module, args, out) -> None:
        if isinstance(out, torch.Tensor) and out.dim() > 0:
            sizes.append(math.prod(out.shape[1:]))

    leaves = [m for m in probe.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(record) for m in leaves]
    try:
        probe(torch.empty((2, *in_shape), device="meta"))
    except (GloroInputError, RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path} does not match this architecture: the backbone fails on the saved input "
            f"shape {in_shape} ({e}). Load it with the architecture it was trained with."
        ) from e
    finally:
        for h in handles:
            h.remove()
    big = max(sizes, default=0)
    if big > MAX_VALUES:
        _too_big(big, in_shape, path)


def _too_big(values: int, in_shape: tuple[int, ...], path) -> None:
    raise CheckpointError(
        f"{path} asks for layer outputs of {values:,} values per sample (in_shape "
        f"{in_shape}), more than the {MAX_VALUES:,} a model file may ask for: the file is "
        f"damaged or was modified. Restore it, or retrain."
    )


def verify_frozen_bound(net, path) -> None:
    """Raises unless the file's frozen fast-mode bound is the one its weights and iterates
    give.

    The iterates must be unit vectors (power iteration normalizes them), and the bound is
    recomputed from them on a copy, as ``refresh`` computed it (no further iterations, so a
    file saved before full convergence still matches; the loaded net keeps the file's values
    bit for bit).
    """
    stored = float(net._frozen_k_pen)
    if math.isnan(stored):  # a mid-epoch checkpoint: computed on first use
        return
    for name, u in net.bounds.named_buffers():
        norm = float(torch.linalg.vector_norm(u.double())) if name.endswith("u") else 1.0
        if not abs(norm - 1) <= _FROZEN_TOL:
            raise CheckpointError(
                f"{path} holds a power-iteration iterate bounds.{name} of norm {norm:.6g}, "
                f"not 1: the file was modified or is damaged. Restore the original file (or "
                f"re-save the net it came from)."
            )
    probe = copy.deepcopy(net)
    probe.power_iterations = 0
    recomputed = float(probe.refresh(converge=False))
    if not abs(stored - recomputed) <= _FROZEN_TOL * recomputed:
        raise CheckpointError(
            f"{path} holds a frozen Lipschitz bound of {stored:.6g}, but its weights and "
            f"iterates give {recomputed:.6g}: the file was modified or is damaged. Restore the "
            f"original file (or re-save the net it came from)."
        )


def _on_meta(m: nn.Module) -> bool:
    return any(t.is_meta for t in m.parameters())


def _section(info: dict[str, Any], name: str, path) -> dict[str, Any]:
    section = info.get(name)
    if not isinstance(section, dict):
        raise CheckpointError(
            f"{path} has no valid '{name}' section in its metadata (got {section!r}): the file "
            f"is damaged or was not written by torchgloro. Restore it, or re-save the model."
        )
    return section


def _field(section: dict[str, Any], name: str, ok, want: str, path) -> Any:
    key = name.split(".")[-1]
    if key not in section or not ok(section[key]):
        got = repr(section[key]) if key in section else "nothing"
        raise CheckpointError(
            f"{path} has an invalid {name} in its metadata: expected {want}, got {got}. The "
            f"file is damaged or was modified; restore it, or re-save the model."
        )
    return section[key]


def _shape(value: Any, name: str, path) -> tuple[int, ...]:
    ok = (
        isinstance(value, list)
        and 1 <= len(value) <= 3
        and all(type(s) is int and s > 0 for s in value)
    )
    if not ok:
        raise CheckpointError(
            f"{path} has an invalid {name} in its metadata: expected 1 to 3 positive integers, "
            f"got {value!r}. The file is damaged or was modified; restore it, or re-save it."
        )
    if math.prod(value) > MAX_VALUES:
        raise CheckpointError(
            f"{path} has {name} {value}: {math.prod(value):,} values per sample, more than the "
            f"{MAX_VALUES:,} a model file may ask for. The file is damaged or was modified."
        )
    return tuple(value)
