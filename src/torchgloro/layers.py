"""Moved: the layers to :mod:`torchgloro.nn.layers`, their bounds to
:mod:`torchgloro.bounds.nn_layers`. Every name of the old module is here, from its new home.
"""

from torchgloro.bounds.nn_layers import *  # noqa: F403
from torchgloro.bounds.nn_layers import __all__ as _bounds
from torchgloro.nn.layers import *  # noqa: F403
from torchgloro.nn.layers import __all__ as _layers

__all__ = [*_layers, *_bounds]
