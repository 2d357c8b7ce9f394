"""Speed and memory benchmark of the presses, run by ``mixkv bench``.

- :mod:`~mixkv.benchmarks.timed_runs`: the timed cells (prefill, compression, decode, cache bytes)
  and the check that memory stays flat over consecutive generations.
- :mod:`~mixkv.benchmarks.peak_memory`: the peak-memory sampler around one run.
- :mod:`~mixkv.benchmarks.random_models`: randomly initialised models of real shapes to time.
- :mod:`~mixkv.benchmarks.bench_report`: machine description, ``bench.json``, ``bench.md`` and plots.
"""
