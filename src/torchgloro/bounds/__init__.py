"""The bound engine: every proven or estimated ℓ2 Lipschitz bound, from one layer to a graph.

What lives here, and why each belongs to the engine:

* :mod:`~torchgloro.bounds.registry`: ``LayerBound``, the base of every per-layer bound, and
  the registry (``register_bound``) that maps a layer type to its bound.
* :mod:`~torchgloro.bounds.builtin`: the paper's layers (Linear, Conv2d, pooling, padding,
  MinMax/GroupSort); :mod:`~torchgloro.bounds.elementwise` (activations, dropout) and
  :mod:`~torchgloro.bounds.linear_maps` (BatchNorm, adaptive pooling, Conv1d, ...) and
  :mod:`~torchgloro.bounds.nn_layers` (the layers of :mod:`torchgloro.nn`): the rest.
  Importing this package registers all of them.
* :mod:`~torchgloro.bounds.sound`, :mod:`~torchgloro.bounds.sound_linalg`,
  :mod:`~torchgloro.bounds.sound_conv`: the sound linear algebra, proven upper bounds on
  operator norms with their float round-off; the per-layer bounds' ``sound()`` is built on it.
* :mod:`~torchgloro.bounds.trace`, :mod:`~torchgloro.bounds.capture`,
  :mod:`~torchgloro.bounds.plan`, :mod:`~torchgloro.bounds.ops`,
  :mod:`~torchgloro.bounds.tensor_ops`, :mod:`~torchgloro.bounds.graph`,
  :mod:`~torchgloro.bounds.roundoff`: graph capture and composition, a user's own model as
  one bound (compose multiplies, add adds, concatenate takes the root of the sum of squares).
* :mod:`~torchgloro.bounds.structure`: checks that the bounds still describe the network they
  were built for (no module, setting or hook changed behind them): a guard of the bounds.
* :mod:`~torchgloro.bounds.weight_cache`: the proven bounds cached per value of the weights,
  and the generation counter that keys every such cache: state of the bounds, not of a net.

The layers themselves live in :mod:`torchgloro.nn`; ``GloroNet`` and certification, which
use this engine, at the top level.
"""

from torchgloro.bounds import elementwise, linear_maps, nn_layers
from torchgloro.bounds.graph import GraphBound
from torchgloro.bounds.trace import trace

__all__ = ["GraphBound", "trace", "elementwise", "linear_maps", "nn_layers"]
