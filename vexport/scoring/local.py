"""The local engine: one process, the input streamed window by window (memory flat in the number of rows)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from vexport.scoring.commit import WindowCommitter
from vexport.scoring.inputs import InputPlan, Window, read_windows
from vexport.scoring.job import ModelInfo
from vexport.scoring.rows import line_limit
from vexport.scoring.scorer import ScorerOptions, WindowScorer

log = logging.getLogger(__name__)


class LocalEngine:
    """Runs in this process: ``with LocalEngine() as engine: engine.run(...)``."""

    name = "local"

    def __init__(self, device: str | None = None, threads: int | None = None):
        self.device, self.threads = device, threads

    def __enter__(self) -> "LocalEngine":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def run(self, info: ModelInfo, plan: InputPlan, windows: Sequence[Window], options: ScorerOptions,
            commit: WindowCommitter) -> dict:
        """Load the model once, then read, score and commit each pending window in input order."""
        from vexport.runtime import load

        if self.threads:
            torch.set_num_threads(self.threads)
        model = load(info.name, device=self.device, threads=self.threads)
        scorer = WindowScorer(model, options, plan.id_kind)
        log.info("local engine: %s on %s, %d windows to score", model.format, model.device, len(windows))
        for window, lines in read_windows(plan, windows, line_limit(options.max_length)):
            commit(window, scorer(window.start, lines))
        return {"engine": "local", "workers": 1, "threads": torch.get_num_threads(), "device": str(model.device)}
