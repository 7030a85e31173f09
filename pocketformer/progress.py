"""Progress bars on stderr for long steps (calibration passes, export, benchmark runs)."""
from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
    if os.environ.get("POCKETFORMER_NO_PROGRESS"):
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total, file=sys.stderr, leave=False,
                mininterval=0.5 if sys.stderr.isatty() else 5.0, dynamic_ncols=True)


def say(message: str) -> None:
    """One status line on stderr; stdout is kept for results."""
    print(f"[pocketformer] {message}", file=sys.stderr, flush=True)
