"""Moved to :mod:`torchgloro.nn.liresnet` (the LiResNet architecture).

The old path stays importable as the very same module object, so every name works as before.
"""

import sys

from torchgloro.nn import liresnet

sys.modules[__name__] = liresnet
