"""faststeal's throughput benchmarks (scripts, not timed tests).

``python -m benchmarks.run_all [--quick | --gpu-quick]`` runs them all and writes JSON + markdown;
``bench_ops``, ``bench_train`` and ``bench_e2e`` also run on their own
(``python -m benchmarks.bench_ops --quick``). Results and the hardware they came from are kept
in ``docs/benchmarks.md``.
"""
