"""Progress for long work: a rich progress bar on stderr when asked for (the CLI asks), a log line otherwise."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

log = logging.getLogger("vexport")


@contextlib.contextmanager
def progress_bar(description: str, total: int | None, enabled: bool) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n=1)``. Library calls log start and end; the bar is drawn only when enabled."""
    start = time.perf_counter()
    log.info("%s ...", description)
    if not enabled:
        yield lambda n=1: None
    else:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)
    log.info("%s done in %.1f s", description, time.perf_counter() - start)
