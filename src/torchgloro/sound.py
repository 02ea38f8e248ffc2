"""Moved to :mod:`torchgloro.bounds.sound` (the proven operator-norm upper bounds).

The old path stays importable as the very same module object, so every name works as before.
"""

import sys

from torchgloro.bounds import sound

sys.modules[__name__] = sound
