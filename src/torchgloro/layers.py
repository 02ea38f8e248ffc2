"""Moved to :mod:`torchgloro.nn.layers` (LiResBlock, Residual, LLNLinear).

The old path stays importable as the very same module object, so every name works as before.
"""

import sys

from torchgloro.nn import layers

sys.modules[__name__] = layers
