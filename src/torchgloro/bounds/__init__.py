"""The bound engine for any model: graph capture, graph composition, more layers' bounds.

Importing it registers the bounds of :mod:`~torchgloro.bounds.elementwise` (activations,
dropout) and :mod:`~torchgloro.bounds.linear_maps` (BatchNorm, adaptive pooling, Conv1d).
"""

from torchgloro.bounds import elementwise, linear_maps
from torchgloro.bounds.graph import GraphBound
from torchgloro.bounds.trace import trace

__all__ = ["GraphBound", "trace", "elementwise", "linear_maps"]
