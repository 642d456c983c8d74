"""What the benchmarks record beside pytest-benchmark's own table.

With ``--benchmark-disable`` (how the test suite runs ``bench/``: each benchmark once, as
a smoke test) pytest-benchmark keeps no statistics, so there is no median to compare;
these helpers then record nothing instead of failing.
"""

from typing import Optional


def median(benchmark) -> Optional[float]:
    """The benchmark's median in seconds, or None when benchmarks are disabled."""
    stats = benchmark.stats
    return None if stats is None else stats.stats.median


def record_rate(benchmark, key: str, count: int) -> None:
    """``count`` things per second at the median, in the JSON's extra_info."""
    seconds = median(benchmark)
    if seconds:
        benchmark.extra_info[key] = count / seconds


def record_speedup(benchmark, key: str, reference: Optional[float]) -> None:
    """How many times faster than ``reference`` seconds (when both are known)."""
    seconds = median(benchmark)
    if seconds and reference:
        benchmark.extra_info[key] = round(reference / seconds, 2)
