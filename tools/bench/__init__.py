"""Benchmarks behind ``tools/bench_db`` and ``tools/bench_ipc``.

Each benchmark runs the variants it compares in the same run, names the
machine it ran on, prints a table and can write the same figures as JSON
(see ``tools.bench.report``). Tests run them with tiny sizes and never
assert a speed: performance is measured, not asserted.
"""
