"""Benchmarks of torchgloro (issue 7): ``python -m benchmarks.NAME [--quick]``.

* ``train_overhead``: GloRo vs standard training, per epoch and per instance memory.
* ``certify_overhead``: certification (fast / sound) vs plain inference.
* ``scaling``: per-step overhead vs batch size and model width.
* ``peer_tf_gloro``: a training epoch vs the TF original's (gloro 1.1.1), from a peer venv
  made by ``benchmarks/peer_tf_gloro_setup.sh``.

Results go to ``benchmarks/results/<name>-<device>[-quick].json``; see docs/performance.md.
"""
