"""torchgloro: globally-robust (GloRo) neural networks in PyTorch.

A GloRo net appends a ⊥ logit to a backbone f, built from a Lipschitz bound, so that any
non-⊥ prediction is certified robust on the whole ℓ2 ball of radius ε (Leino, Wang and
Fredrikson, ICML 2021).
"""

from torchgloro._errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    GloroError,
    GloroInputError,
    UnsoundBoundError,
    UnsupportedLayerError,
)
from torchgloro._lazy import lazy_attributes

# Imported on first use (torch is slow to import; `gloro --help` needs none of it).
__getattr__, __dir__ = lazy_attributes(
    __name__,
    {
        **{
            m: f"torchgloro.{m}"
            for m in (
                "activations",
                "bounds",
                "data",
                "evaluate",
                "gloro",
                "io",
                "layers",
                "liresnet",
                "lipschitz",
                "local",
                "losses",
                "margins",
                "models",
                "nn",
                "schedules",
                "sound",
                "train",
            )
        },  # fmt: skip
        "GroupSort": "torchgloro.nn.activations",
        "MinMax": "torchgloro.nn.activations",
        "DeployedGloroNet": "torchgloro._deploy",  # _: its module must not shadow deploy()
        "deploy": "torchgloro._deploy",
        "Certificate": "torchgloro.gloro",
        "GloroNet": "torchgloro.gloro",
        "load": "torchgloro.io",
        "LiResBlock": "torchgloro.nn.layers",
        "LLNLinear": "torchgloro.nn.layers",
        "Residual": "torchgloro.nn.layers",
        "ConstantBound": "torchgloro.bounds.registry",
        "LayerBound": "torchgloro.bounds.registry",
        "register_bound": "torchgloro.bounds.registry",
        "supported_layers": "torchgloro.bounds.registry",
        "LOSSES": "torchgloro.losses",
        "GloroCrossEntropy": "torchgloro.losses",
        "GloroEMMA": "torchgloro.losses",
        "GloroHinge": "torchgloro.losses",
        "GloroTrades": "torchgloro.losses",
        "create_model": "torchgloro.nn.models",
        "list_models": "torchgloro.nn.models",
    },
)

__version__ = "0.1.0"

__all__ = [
    "GloroNet",
    "Certificate",
    "deploy",
    "DeployedGloroNet",
    "load",
    "create_model",
    "list_models",
    "GloroCrossEntropy",
    "GloroTrades",
    "GloroEMMA",
    "GloroHinge",
    "LOSSES",
    "LiResBlock",
    "LLNLinear",
    "Residual",
    "MinMax",
    "GroupSort",
    "register_bound",
    "supported_layers",
    "LayerBound",
    "ConstantBound",
    "GloroError",
    "GloroInputError",
    "UnsupportedLayerError",
    "DatasetError",
    "CheckpointError",
    "ConfigError",
    "UnsoundBoundError",
    "train",
    "evaluate",
    "bounds",
    "data",
    "layers",
    "liresnet",
    "losses",
    "models",
    "nn",
    "schedules",
    "__version__",
]
