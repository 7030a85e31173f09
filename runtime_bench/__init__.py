"""Stage 3: measure exported artifacts where they run (host today; emulated ARM and phones next)."""
from pocketformer.runtime_bench.host import TARGETS, BenchConfig, BenchResult, bench, host_device
from pocketformer.runtime_bench.stats import summarize

__all__ = ["TARGETS", "BenchConfig", "BenchResult", "bench", "host_device", "summarize"]
