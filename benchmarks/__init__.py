"""Benchmarks of torchgloro (issue 7): ``python -m benchmarks.NAME [--quick]``.

* ``train_overhead``: GloRo vs standard training, per epoch and per instance memory.
* ``certify_overhead``: certification (fast / sound) vs plain inference.
* ``scaling``: per-step overhead vs batch size and model width.

Results go to ``benchmarks/results/<name>-<device>[-quick].json``; see docs/performance.md.
"""
