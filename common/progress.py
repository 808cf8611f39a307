"""Progress for loops longer than a few seconds: a tqdm bar on a terminal, and when the output
goes to a file or a CI log (no terminal, where tqdm stays silent), one plain line at a steady
interval, so a piped run never looks hung.

    for x, y in progress(train, desc=f"epoch {epoch}"):
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], desc: str = "", every_s: float = 30.0) -> Iterator[T]:
    """Yield ``items``: a bar on a terminal, else print ``desc: i/n`` every ``every_s`` seconds."""
    if sys.stderr.isatty():
        yield from tqdm(items, desc=desc, leave=False)
        return
    total = len(items) if hasattr(items, "__len__") else None
    start = last = time.monotonic()
    for i, item in enumerate(items, start=1):
        yield item
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            done = f"{i}/{total}" if total else f"{i}"
            print(f"{desc}: {done} batches, {now - start:.0f} s", file=sys.stderr, flush=True)
