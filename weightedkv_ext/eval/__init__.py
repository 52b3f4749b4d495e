"""Evaluation harness: perplexity (Table I of the WeightedKV paper), passkey / needle retrieval
and next-token KL against the full cache.

``python -m weightedkv_ext.eval --help`` (console script ``weightedkv-eval``, entry point
``weightedkv_ext.eval.cli:main``); needs the ``eval`` extra (``pip install .[eval]``: tqdm,
matplotlib), imported only when the harness runs, never by ``import weightedkv_ext``.
``benchmarks/bench_eval_speed.py`` compares its throughput with a plain decode loop.
Modules: ``protocol`` (perplexity windows, counted tokens, batched runs), ``data`` (texts and
tokenisation), ``caches`` (the cache factory), ``runner`` (perplexity cells, progress), ``report``
(results.json / results.md, resume), ``plot`` (PNG), ``tasks`` (passkey / niah prompts, scoring,
Wilson intervals), ``taskrun`` (retrieval and KL runs, resumable store), ``taskreport`` (their
tables and plots), ``taskcli`` and ``cli``.
"""
