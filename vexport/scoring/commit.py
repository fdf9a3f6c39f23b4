"""Where both engines hand over a scored window: the input check, the --strict check, the part commit, the
progress count."""

from __future__ import annotations

from collections.abc import Callable

from vexport.errors import VexportError
from vexport.scoring.inputs import InputPlan, Window, check_unchanged
from vexport.scoring.scorer import OUTSIDE_VOCABULARY
from vexport.scoring.sink import OutputFolder


class WindowCommitter:
    """``committer(window, table)`` commits one window table; counts this run's rows and tokens."""

    def __init__(self, folder: OutputFolder, plan: InputPlan, strict: bool, advance: Callable[[int, int], None]):
        self.folder, self.plan, self.strict, self.advance = folder, plan, strict, advance
        self.rows = self.tokens = 0

    def __call__(self, window: Window, table) -> None:
        check_unchanged(self.plan.files[window.file])  # an edit, truncation or replacement since indexing stops here
        self._check_vocabulary(window, table)
        if self.strict:
            self._check_strict(window, table)
        info = self.folder.commit(window.start, window.stop, table)
        self.rows += window.rows
        self.tokens += info.tokens
        self.advance(window.rows, info.tokens)

    def _check_vocabulary(self, window: Window, table) -> None:
        """A token id the model has no embedding for: the tokenizer does not fit the model, so the run stops
        (exit code 2) at the first such row, named by its file and line, whatever --strict says."""
        errors = [(r, e) for r, e in zip(table["row"].to_pylist(), table["error"].to_pylist())
                  if e is not None and OUTSIDE_VOCABULARY in e]
        if errors:
            row, reason = min(errors)
            raise VexportError(f"{where(self.plan, window, row)}: {reason}")

    def _check_strict(self, window: Window, table) -> None:
        """--strict: the window's first rejected row stops the run (exit code 2), naming its file and line."""
        errors = [(r, e) for r, e in zip(table["row"].to_pylist(), table["error"].to_pylist()) if e is not None]
        if errors:
            row, reason = min(errors)
            raise VexportError(f"--strict: {where(self.plan, window, row)}: {reason}")


def where(plan: InputPlan, window: Window, row: int) -> str:
    """A row as a person finds it: file:line for JSONL, file row N for Parquet (both 1-based)."""
    file = plan.files[window.file]
    local = row - file.first_row + 1
    return f"{file.path}:{local} (row {row})" if file.kind == "jsonl" else f"{file.path} row {local} (row {row})"
