"""Layers, activations and architectures: what a GloRo net's backbone is built from.

* :mod:`~torchgloro.nn.layers`: LiResBlock, Residual, LLNLinear (each with its bound);
* :mod:`~torchgloro.nn.activations`: MinMax, GroupSort;
* :mod:`~torchgloro.nn.models`: the architecture registry (``create_model``), the paper's nets;
* :mod:`~torchgloro.nn.liresnet`: the LiResNet family, registered with ``models``.

Names are imported on first use, as in :mod:`torchgloro`.
"""

from torchgloro._lazy import lazy_attributes

__getattr__, __dir__ = lazy_attributes(
    __name__,
    {
        **{m: f"torchgloro.nn.{m}" for m in ("activations", "layers", "liresnet", "models")},
        "GroupSort": "torchgloro.nn.activations",
        "MinMax": "torchgloro.nn.activations",
        "LiResBlock": "torchgloro.nn.layers",
        "LLNLinear": "torchgloro.nn.layers",
        "Residual": "torchgloro.nn.layers",
        "create_model": "torchgloro.nn.models",
        "list_models": "torchgloro.nn.models",
        "register_model": "torchgloro.nn.models",
    },
)

__all__ = [
    "LiResBlock",
    "LLNLinear",
    "Residual",
    "MinMax",
    "GroupSort",
    "create_model",
    "list_models",
    "register_model",
    "activations",
    "layers",
    "liresnet",
    "models",
]
