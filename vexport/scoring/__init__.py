"""Score datasets with a value model: ``score(model, input, output)``, in-process or on a Ray cluster.

    input (JSONL/Parquet, a file or a folder) ─► inputs.py: index once, read window by window
        ─► engine: local.py (one process) or ray.py (Ray Data + an actor pool)
            each window: rows.py (validate, render, tokenize) ─► scorer.py (token-budget batches, values)
        ─► commit.py (input unchanged? --strict) ─► sink.py: part-{start}-{stop}.parquet, errors.jsonl, run.json
        ─► the whole input checked once more ─► summary.json

The input is checked three times: every window's bytes against the hashes taken when it was indexed, as they
are read (inputs.py); its file's size, mtime and inode before its part commits (commit.py); and the folder's
file list and every file again before summary.json says the run is complete. A change is one line naming the
file (exit code 2), with the parts committed before it kept for --resume.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from vexport.batching import DEFAULT_BATCH_TOKENS
from vexport.errors import InputError, MissingDependencyError, VexportError
from vexport.paths import refuse_overlap
from vexport.scoring.sink import read_errors, read_scores

__all__ = ["ENGINES", "RAY_INSTALL", "read_errors", "read_scores", "score"]

log = logging.getLogger(__name__)

ENGINES = ("local", "ray")
RAY_INSTALL = "pip install 'vexport[ray]'"


def score(model: str | Path, input: str | Path, output: str | Path, *, per_token: bool = False,
          max_length: int | None = None, batch_tokens: int = DEFAULT_BATCH_TOKENS, engine: str = "local",
          ray_address: str | None = None, workers: int | None = None, resume: bool = False, strict: bool = False,
          force: bool = False, append_eos: bool = False, part_rows: int = 1024, threads: int | None = None,
          device: str | None = None, padding_side: str = "right", fixed_batch_rows: int | None = None,
          allow_pickle: bool = False, progress: bool = False) -> dict:
    """Score every row of INPUT with MODEL (any artifact, or a Hugging Face value model) into OUTPUT.

    Returns the summary (also written to OUTPUT/summary.json). With ``resume``, windows that already have a
    part are skipped (and when none is left, no model is loaded); the input, model (weights, config, tokenizer
    and chat template) and output-shaping options must be those of the first run. OUTPUT may not be, hold or
    lie inside INPUT or MODEL; ``force`` replaces only a previous score output or an empty folder. A run that
    fails before its first part leaves OUTPUT as it was.
    """
    from vexport.scoring.inputs import check_input_unchanged, find_input_files, index_input
    from vexport.scoring.job import describe_model, resolve_max_length, run_state, summary
    from vexport.scoring.scorer import ScorerOptions
    from vexport.scoring.sink import OutputFolder

    _check_arguments(engine, batch_tokens, workers, threads, ray_address, padding_side, input, output, model)
    find_input_files(Path(input).expanduser().absolute())  # a missing input or a FIFO: before the model is hashed
    info = describe_model(model, allow_pickle=allow_pickle)
    options = ScorerOptions(resolve_max_length(max_length, info), batch_tokens, per_token, append_eos, padding_side,
                            fixed_batch_rows)
    plan = index_input(input, part_rows)
    folder = OutputFolder.open(output, run_state(plan, info, options), resume=resume, force=force)
    done = folder.done()
    pending = [w for w in plan.windows() if w.start not in done]
    log.info("%d of %d windows already scored in %s", len(done), len(done) + len(pending), folder.path)
    try:
        if pending:
            with _engine(engine, ray_address, workers, device, threads) as runner:
                run = _score_pending(runner, folder, info, plan, pending, options, strict, progress)
        else:
            check_input_unchanged(plan)  # the parts (all from earlier runs) are of the input indexed above
            run = {"engine": engine, "workers": None, "rows": 0, "tokens": 0, "seconds": 0.0}
        folder.start()  # a run with nothing to score still leaves a complete output
    except BaseException:
        folder.abandon()
        raise
    folder.rebuild_errors()
    result = summary(plan, info, options, list(folder.parts()), {**run, "skipped_parts": len(done)})
    folder.write_summary(result)
    return result


def _score_pending(runner, folder, info, plan, pending, options, strict: bool, progress: bool) -> dict:
    """Score the windows that have no part yet, then check the whole input once more (before the progress bar
    ends, so that a change is one line, not a finished bar); this run's counts and timing."""
    from vexport.scoring.commit import WindowCommitter
    from vexport.scoring.inputs import check_input_unchanged
    from vexport.scoring.progress import score_progress

    start = time.perf_counter()
    with score_progress(sum(w.rows for w in pending), progress) as advance:
        commit = WindowCommitter(folder, plan, strict, advance)
        run = runner.run(info, plan, pending, options, commit)
        check_input_unchanged(plan)  # every part (this run's and earlier ones) is of the input indexed at the start
    return {**run, "rows": commit.rows, "tokens": commit.tokens, "seconds": time.perf_counter() - start}


def _engine(engine: str, ray_address: str | None, workers: int | None, device: str | None, threads: int | None):
    """The engine, a context manager with ``run(info, plan, windows, options, commit) -> dict``."""
    if engine == "local":
        from vexport.scoring.local import LocalEngine

        return LocalEngine(device=device, threads=threads)
    from vexport.scoring.ray import RayEngine

    return RayEngine(address=ray_address, workers=workers, device=device, threads=threads)


def require_ray() -> None:
    """--engine ray needs the optional Ray Data install."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        raise MissingDependencyError(f"--engine ray needs Ray Data, which is not installed: {RAY_INSTALL}") from None


def _check_arguments(engine: str, batch_tokens: int, workers: int | None, threads: int | None,
                     ray_address: str | None, padding_side: str, input: str | Path, output: str | Path,
                     model: str | Path) -> None:
    if engine not in ENGINES:
        raise VexportError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "local" and (workers is not None or ray_address is not None):
        raise VexportError("--workers and --ray-address are for --engine ray (the local engine is one process)")
    if engine == "ray":
        require_ray()
    if batch_tokens < 1:
        raise VexportError(f"--batch-tokens must be at least 1, got {batch_tokens}")
    for flag, value in (("--workers", workers), ("--threads", threads)):
        if value is not None and value < 1:
            raise VexportError(f"{flag} must be at least 1, got {value}")
    if padding_side not in ("left", "right"):
        raise InputError(f"padding side must be left or right, got {padding_side!r}")
    refuse_overlap(Path(output).expanduser(), [Path(input).expanduser(), Path(model).expanduser()], flag="--output")
