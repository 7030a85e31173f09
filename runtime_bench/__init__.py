"""Stage 3: measure exported artifacts where they run: host, emulated ARM CPUs (QEMU), phones (adb)."""
from pocketformer.runtime_bench.bench import bench
from pocketformer.runtime_bench.config import BenchConfig, BenchResult, parse_target
from pocketformer.runtime_bench.host import host_device
from pocketformer.runtime_bench.stats import summarize

__all__ = ["BenchConfig", "BenchResult", "bench", "host_device", "parse_target", "summarize"]
