"""Perplexity evaluation harness reproducing Table I of the WeightedKV paper.

``python -m weightedkv_ext.eval --help`` (console script ``weightedkv-eval``, entry point
``weightedkv_ext.eval.cli:main``); ``python -m weightedkv_ext.eval.speed`` compares its throughput
with a plain decode loop. Modules: ``protocol`` (windows, counted tokens, batched runs), ``data``
(texts and tokenisation), ``caches`` (the cache factory), ``runner`` (cells, progress),
``report`` (results.json / results.md, resume), ``plot`` (PNG), ``cli``.
"""
