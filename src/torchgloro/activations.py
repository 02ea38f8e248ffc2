"""Moved to :mod:`torchgloro.nn.activations` (MinMax, GroupSort).

The old path stays importable as the very same module object, so every name works as before.
"""

import sys

from torchgloro.nn import activations

sys.modules[__name__] = activations
