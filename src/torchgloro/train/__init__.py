"""Training GloRo nets: configs, recipes, the loop, checkpoints, reports and DDP.

Your own model on your own tensors (:func:`torchgloro.train.api.train`; the package itself
is callable):

>>> import torchgloro as tg
>>> net, result = tg.train(backbone, (x, y), epsilon=0.3, epochs=5, val=1000)
>>> result.history[-1]["val_vra"]

A recipe, as ``gloro train digits-minicnn-gloro --epochs 5`` runs it:

>>> from torchgloro.train import load_config, train
>>> cfg = load_config("digits-minicnn-gloro", ["run.epochs=5"])
>>> result = train(cfg)                      # writes runs/<name>-<timestamp>/
>>> result.final["vra_sound"]
"""

from torchgloro._lazy import callable_module, lazy_attributes
from torchgloro.train.config import (
    DEFAULT_RECIPE,
    DataConfig,
    GloroConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dump_config,
    list_recipes,
    load_config,
    recipe_path,
)

# The loop imports torch: on first use only (`gloro train --help` needs none of it).
__getattr__, __dir__ = lazy_attributes(
    __name__,
    {
        name: "torchgloro.train.loop"
        for name in (
            "LOSSES",
            "OPTIMIZERS",
            "TrainingDivergedError",
            "TrainResult",
            "evaluate",
            "train",
        )
    },  # fmt: skip
)
callable_module(__name__, "torchgloro.train.api", "train")  # tg.train(model, data, ...)

__all__ = [
    "TrainConfig",
    "RunConfig",
    "DataConfig",
    "ModelConfig",
    "GloroConfig",
    "LossConfig",
    "OptimConfig",
    "load_config",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "list_recipes",
    "recipe_path",
    "DEFAULT_RECIPE",
    "train",
    "evaluate",
    "TrainResult",
    "TrainingDivergedError",
    "LOSSES",
    "OPTIMIZERS",
]
