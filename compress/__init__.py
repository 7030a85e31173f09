"""Stage 1: compression methods that return structurally smaller models."""
from pocketformer.compress.registry import METHODS, Calibration, get_method, parse_params, run_step
from pocketformer.compress import drop_layers as _drop_layers  # noqa: F401  (registers)
from pocketformer.compress import layered_prune as _layered_prune  # noqa: F401  (registers)
from pocketformer.compress import see as _see  # noqa: F401  (registers)

__all__ = ["METHODS", "Calibration", "get_method", "parse_params", "run_step"]
