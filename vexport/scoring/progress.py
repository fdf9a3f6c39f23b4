"""The scoring progress bar: rows done of the rows to do, rows/s, tokens/s and the time left (on stderr)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)


@contextlib.contextmanager
def score_progress(total_rows: int, enabled: bool) -> Iterator[Callable[[int, int], None]]:
    """Yield ``advance(rows, tokens)``; the bar is drawn only when enabled (the CLI), a log line at the end."""
    start = time.perf_counter()
    done = {"rows": 0, "tokens": 0}
    with contextlib.ExitStack() as stack:
        bar, task = stack.enter_context(_bar(total_rows)) if enabled else (None, None)

        def advance(rows: int, tokens: int) -> None:
            done["rows"] += rows
            done["tokens"] += tokens
            if bar is not None:
                bar.update(task, advance=rows, tokens=done["tokens"])

        yield advance
    log.info("scored %d rows, %d tokens in %.1f s", done["rows"], done["tokens"], time.perf_counter() - start)


@contextlib.contextmanager
def _bar(total_rows: int):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            elapsed = task.elapsed or 0.0
            if elapsed <= 0:
                return Text("")
            return Text(f"{task.completed / elapsed:,.1f} rows/s, {task.fields['tokens'] / elapsed:,.0f} tokens/s")

    columns = (TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"), RateColumn(),
               TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task("scoring", total=total_rows, tokens=0)
        try:
            yield bar, task
        except BaseException:
            bar.update(task, visible=False)  # an error is one line on its own, not under a stopped bar
            raise
