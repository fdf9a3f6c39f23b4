"""The Ray engine: Ray Data reads the input windows, a pool of actors scores them, the driver commits the parts.

Reading is a Ray Data datasource whose blocks are whole windows (one row each: the window's raw rows), so a
window is never split between actors and is batched exactly as the local engine batches it. ``map_batches``
runs :class:`WindowActor`, which loads the model once per actor (one GPU per actor where the cluster has GPUs,
CPU actors otherwise). The driver receives each window's rows and commits them through the same sink as the
local engine, so the output folder (parts, errors.jsonl, resume) is the same. Reads run on the driver's node;
only MODEL (a folder on a shared file system, or a hub id) must be reachable from every node. Ray does all the
distribution: there is no scheduler or worker pool here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import os
import re
import socket
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import ray
import ray.data
import ray.exceptions
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from vexport.errors import VexportError
from vexport.scoring.commit import WindowCommitter
from vexport.scoring.inputs import InputPlan, Window, read_windows
from vexport.scoring.job import ModelInfo
from vexport.scoring.rows import line_limit
from vexport.scoring.scorer import ScorerOptions, WindowScorer

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0  # for the TCP check of --ray-address before ray.init
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAISED = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)): (\S.*)$")


class RayEngine:
    """``with RayEngine(address, workers) as engine: engine.run(...)``: joins the cluster at ADDRESS (or the one
    this process is already in, or RAY_ADDRESS, or starts a local instance) and settles the actors' resources
    on entry, before any output is written; shuts down on exit only what it started."""

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None, device: str | None = None,
                 threads: int | None = None):
        self.address, self.workers, self.device, self.threads = address, workers, device, threads
        self.started, self.resources = False, {}

    def __enter__(self) -> "RayEngine":
        self.started = connect(self.address)
        try:
            self.workers, self.resources, self.device, self.threads = actor_resources(self.workers, self.device,
                                                                                      self.threads)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.started:
            ray.shutdown()
            self.started = False

    def run(self, info: ModelInfo, plan: InputPlan, windows: Sequence[Window], options: ScorerOptions,
            commit: WindowCommitter) -> dict:
        log.info("ray engine: %d workers (%s), %d windows to score", self.workers, self.resources, len(windows))
        if windows:
            with _quiet_data_context():
                self._stream(info, plan, windows, options, commit)
        return {"engine": "ray", "workers": self.workers, "threads": self.threads, "device": self.device,
                "ray_address": ray.get_runtime_context().gcs_address}

    def _stream(self, info: ModelInfo, plan: InputPlan, windows: Sequence[Window], options: ScorerOptions,
                commit: WindowCommitter) -> None:
        """read_datasource -> map_batches(WindowActor) -> the driver commits each window as it comes back."""
        readers = min(len(windows), 2 * self.workers)  # reading is light: a few readers keep the actors busy
        dataset = ray.data.read_datasource(WindowDatasource(plan, windows, line_limit(options.max_length)),
                                           concurrency=readers, override_num_blocks=readers, **_zero_cpu_reads())
        dataset = dataset.map_batches(
            WindowActor, batch_size=1, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=self.workers),
            fn_constructor_kwargs={"model": info.name, "options": options, "id_kind": plan.id_kind,
                                   "device": self.device, "threads": self.threads}, **self.resources)
        buffer = WindowBuffer(windows)
        try:
            for block in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                for window, table in buffer.add(block):
                    commit(window, table)
        except Exception as exc:  # Ray wraps what a worker or a read task raised (bad input, a changed input
            # file, a worker that cannot start); the driver's own VexportError (a commit check) passes as it is
            if isinstance(exc, VexportError) and not isinstance(exc, ray.exceptions.RayError):
                raise
            raise _as_vexport_error(exc) from None


def connect(address: str | None) -> bool:
    """ray.init unless this process is already connected; True when this call connected (and must shut down).

    A HOST:PORT (or ray://HOST:PORT) address is tried with a plain TCP connection first, bounded by
    CONNECT_TIMEOUT_S: ray.init itself retries an address where nothing answers for minutes."""
    if ray.is_initialized():
        return False
    flag = "--ray-address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address not in ("local", "auto"):
        _check_reachable(address, flag)
    kwargs = {"include_dashboard": False} if address == "local" else {}
    try:
        ray.init(address=address, logging_level=logging.WARNING, **kwargs)
    except (ConnectionError, ValueError) as exc:
        raise VexportError(f"--ray-address {address}: cannot join the Ray cluster ({' '.join(str(exc).split())})") \
            from None
    return True


def _check_reachable(address: str, flag: str) -> None:
    """Something must accept a TCP connection at ADDRESS's host and port (when it names a port)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # no port to try: ray.init reads the address its own way
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise VexportError(f"{flag} {address}: cannot reach the Ray cluster ({reason}, within {CONNECT_TIMEOUT_S:g} "
                           "s); is a Ray head running there (ray start --head)?") from None


_QUIET_LOGGERS = {"ray.data._internal.progress": logging.ERROR,  # "Progress bars disabled": we disabled them
                  "ray.data._internal.execution.streaming_executor": logging.WARNING}  # "execution finished in"


@contextlib.contextmanager
def _quiet_data_context() -> Iterator[None]:
    """Ray Data's own progress bars, start-of-run and end-of-run lines off while vexport's bar runs (restored
    after), so that an error is one line."""
    context = ray.data.DataContext.get_current()
    names = [n for n in ("enable_progress_bars", "print_on_execution_start") if hasattr(context, n)]
    saved = {n: getattr(context, n) for n in names}
    levels = {name: logging.getLogger(name).level for name in _QUIET_LOGGERS}
    for name in names:
        setattr(context, name, False)
    for name, level in _QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(context, name, value)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def actor_resources(workers: int | None, device: str | None, threads: int | None) -> tuple[int, dict, str, int]:
    """(workers, resources per actor, device, threads): one GPU per actor where the cluster has GPUs."""
    total = ray.cluster_resources()
    gpus, cpus = int(total.get("GPU", 0)), int(total.get("CPU", 0))
    if device and device.startswith("cuda") and not gpus:
        raise VexportError(f"--device {device}: the Ray cluster has no GPUs")
    if gpus and device != "cpu":
        workers = workers or gpus
        if workers > gpus:
            raise VexportError(f"--workers {workers}: the Ray cluster has {gpus} GPUs (one per worker)")
        return workers, {"num_gpus": 1, "num_cpus": 1}, "cuda", threads or 1
    per_actor = threads or 1
    workers = workers or max(1, cpus // per_actor)
    if workers * per_actor > cpus:
        raise VexportError(f"--workers {workers} x {per_actor} threads: the Ray cluster has {cpus} CPUs")
    return workers, {"num_cpus": per_actor}, device or "cpu", per_actor


def _zero_cpu_reads() -> dict:
    """Read tasks take no CPU slot (reading is light; the actors hold the CPUs): named where Ray names it."""
    if "num_cpus" in inspect.signature(ray.data.read_datasource).parameters:
        return {"num_cpus": 0}
    return {"ray_remote_args": {"num_cpus": 0}}


def _as_vexport_error(exc: Exception) -> Exception:
    """A VexportError raised in a worker, or one line for an actor that died starting; else EXC itself.

    An actor that fails in its constructor reaches the driver as an ActorDiedError (caused by Ray Data's empty
    SystemException) whose text is the worker's traceback: its last "module.Error: message" line is the cause.
    """
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = getattr(exc, "cause", None) or exc.__cause__
    for link in chain:  # Ray's RayTaskError(InputChangedError) is a VexportError too, but its text is a traceback
        if isinstance(link, VexportError) and not isinstance(link, ray.exceptions.RayError):
            return VexportError(str(link))
    died = next((link for link in chain if isinstance(link, ray.exceptions.RayActorError)), None)
    for link in chain:
        raised = worker_exception(str(link))
        if raised and raised[0].startswith(("vexport.errors.", "vexport.scoring.inputs.")):
            return VexportError(raised[1])
        if raised and died is not None:
            return VexportError(f"a Ray worker could not start: {raised[0].rpartition('.')[2]}: {raised[1]}")
    if died is not None:
        lines = [line.strip() for line in _ANSI.sub("", str(died)).splitlines() if line.strip()]
        return VexportError(f"a Ray worker could not start: {lines[0][:300] if lines else type(died).__name__}")
    return chain[0]


def worker_exception(text: str) -> tuple[str, str] | None:
    """(qualified name, message) of the last exception line ("pkg.mod.SomeError: message") in a traceback text."""
    for line in reversed(_ANSI.sub("", text).splitlines()):
        match = _RAISED.match(line.strip())
        if match:
            return match.group(1), match.group(2)
    return None


class WindowDatasource(Datasource):
    """The pending windows as a Ray Data source: each block is one window, read by a Ray task."""

    def __init__(self, plan: InputPlan, windows: Sequence[Window], limit: int):
        super().__init__()
        self.plan, self.windows, self.limit = plan, list(windows), limit

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    @property
    def supports_distributed_reads(self) -> bool:
        """Read on the driver's node, which indexed the input and so can read it (reading is light)."""
        return False

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        size = -(-len(self.windows) // max(1, min(parallelism, len(self.windows))))
        chunks = [self.windows[i:i + size] for i in range(0, len(self.windows), size)]
        return [ReadTask(functools.partial(_read_blocks, self.plan, chunk, self.limit), _metadata(len(chunk)))
                for chunk in chunks]


def _read_blocks(plan: InputPlan, windows: list[Window], limit: int) -> Iterator[pa.Table]:
    for window, lines in read_windows(plan, windows, limit):
        yield pa.table({"start": [window.start], "lines": pa.array([lines], type=pa.list_(pa.binary()))})


def _metadata(num_rows: int) -> BlockMetadata:
    """BlockMetadata across Ray versions (older ones also take a schema)."""
    kwargs = {"num_rows": num_rows, "size_bytes": None, "input_files": None, "exec_stats": None}
    if "schema" in {f.name for f in dataclasses.fields(BlockMetadata)}:
        kwargs["schema"] = None
    return BlockMetadata(**kwargs)


class WindowActor:
    """Loads the model once per actor; each call scores one window (a one-row batch) into its window table."""

    def __init__(self, model: str, options: ScorerOptions, id_kind: str | None, device: str, threads: int):
        import torch
        from transformers.utils import logging as hf_logging

        from vexport.runtime import load

        hf_logging.disable_progress_bar()
        torch.set_num_threads(threads)
        self.scorer = WindowScorer(load(model, device=device, threads=threads), options, id_kind)

    def __call__(self, batch: pa.Table) -> pa.Table:
        starts, lines = batch["start"].to_pylist(), batch["lines"].to_pylist()
        return pa.concat_tables([self.scorer(start, rows) for start, rows in zip(starts, lines)])


class WindowBuffer:
    """Gathers the rows Ray hands back until a window is complete, however Ray cut or joined the blocks."""

    def __init__(self, windows: Sequence[Window]):
        self.windows = sorted(windows, key=lambda w: w.start)
        self.starts = np.array([w.start for w in self.windows])
        self.pieces: dict[int, list[pa.Table]] = {}

    def add(self, table: pa.Table) -> Iterator[tuple[Window, pa.Table]]:
        index = np.searchsorted(self.starts, table["row"].to_numpy(), side="right") - 1
        for i in np.unique(index):
            window = self.windows[i]
            pieces = self.pieces.setdefault(window.start, [])
            pieces.append(table.filter(pa.array(index == i)))
            if sum(p.num_rows for p in pieces) == window.rows:
                whole = pa.concat_tables(self.pieces.pop(window.start)).sort_by("row")
                if whole["row"].to_pylist() != list(range(window.start, window.stop)):
                    raise RuntimeError(f"rows of window {window.start}-{window.stop} came back incomplete")
                yield window, whole
