"""Typed errors a user can cause, each mapped to a documented exit code.

0 success, 2 bad input (recipe, model, data, arguments), 3 a budget or gate failed,
4 a runtime or device failure. The CLI turns these into one line on stderr; nothing
else in the tool should call sys.exit.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_BUDGET = 3
EXIT_RUNTIME = 4
EXIT_INTERRUPTED = 130


class PocketformerError(Exception):
    exit_code = EXIT_RUNTIME

    def __init__(self, message: str, *, file: str | None = None, field: str | None = None,
                 device: str | None = None):
        self.message = message
        self.file = file
        self.field = field
        self.device = device
        super().__init__(self.describe())

    def describe(self) -> str:
        where = []
        if self.file:
            where.append(str(self.file))
        if self.field:
            where.append(self.field)
        if self.device:
            where.append(f"device {self.device}")
        prefix = ": ".join(where)
        return f"{prefix}: {self.message}" if prefix else self.message


class BadInputError(PocketformerError):
    """The recipe, model, data or arguments are wrong; fix the input and rerun."""
    exit_code = EXIT_BAD_INPUT


class BudgetError(PocketformerError):
    """A budget or gate (size, latency, quality, parity) failed; the report says which."""
    exit_code = EXIT_BUDGET


class RuntimeFailure(PocketformerError):
    """A runtime, exporter or device failed while doing valid work."""
    exit_code = EXIT_RUNTIME
