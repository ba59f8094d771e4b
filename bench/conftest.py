"""pytest-benchmark view of the benchmark suite: ``pytest bench/`` times every case
and implementation of ``lipkernels bench``'s quick preset (``LIPKERNELS_BENCH_PRESET``
picks another), grouped by case. ``lipkernels bench`` is the main command: it times the
implementations of a case in alternation and reports speedups, bandwidth and launches."""
