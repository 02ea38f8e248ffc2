"""Moved to :mod:`torchgloro.bounds.registry` (per-layer bounds: their registry and base).

The old path stays importable as the very same module object, so every name works as before.
"""

import sys

from torchgloro.bounds import registry

sys.modules[__name__] = registry
