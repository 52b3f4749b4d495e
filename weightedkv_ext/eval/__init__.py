"""Perplexity evaluation harness reproducing Table I of the WeightedKV paper.

``python -m weightedkv_ext.eval --help`` (console script ``weightedkv-eval``); the protocol is in
``protocol.py``, texts in ``data.py``, caches in ``caches.py``, outputs in ``report.py``/``plot.py``.
"""
