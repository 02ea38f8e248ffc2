"""torchgloro: globally-robust (GloRo) neural networks in PyTorch.

A GloRo net appends a ⊥ logit to a backbone f, built from a Lipschitz bound, so that any
non-⊥ prediction is certified robust on the whole ℓ2 ball of radius ε (Leino, Wang and
Fredrikson, ICML 2021).
"""

from torchgloro import bounds, data, layers, liresnet, losses, models, schedules
from torchgloro._errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    GloroError,
    GloroInputError,
    UnsoundBoundError,
    UnsupportedLayerError,
)
from torchgloro.activations import GroupSort, MinMax
from torchgloro.deploy import DeployedGloroNet, deploy
from torchgloro.gloro import Certificate, GloroNet
from torchgloro.io import load
from torchgloro.layers import LiResBlock, LLNLinear, Residual
from torchgloro.lipschitz import ConstantBound, LayerBound, register_bound, supported_layers
from torchgloro.losses import LOSSES, GloroCrossEntropy, GloroEMMA, GloroHinge, GloroTrades
from torchgloro.models import create_model, list_models

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
    "bounds",
    "data",
    "layers",
    "liresnet",
    "losses",
    "models",
    "schedules",
    "__version__",
]
