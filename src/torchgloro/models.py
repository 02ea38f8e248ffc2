"""Moved to :mod:`torchgloro.nn.models` (the architecture registry).

The old path stays importable as the very same module object, so every name works as before.
"""

import sys

from torchgloro.nn import models

sys.modules[__name__] = models
