"""The output folder of a scoring run: Parquet parts, errors.jsonl, run.json (hashes for resume), checksums.jsonl,
summary.json.

Each part holds the scored rows of one input window, ``part-{start:012d}-{stop:012d}.parquet``, and is written
to a hidden temporary name and renamed when complete, so a part is either whole or absent. The window's
rejected rows and counts travel in the part's own metadata, so one rename commits everything about the
window; errors.jsonl is appended as parts commit and rebuilt from the parts at the start and end of every run.
Part names come from the input plan, so a window scored twice (a resumed run) replaces itself: no row can
appear twice, and a resumed run scores exactly the windows that have no part.

Nothing is written until the first part commits: a run that fails before it (a model that does not load, a
Ray cluster that cannot be joined, --strict on the first window) leaves the folder as it found it. Each part's
sha256 is appended to checksums.jsonl (the run state beside run.json, append-only so that a run of many parts
does not rewrite it each time) before the part is renamed into place; --resume and read_scores check every part
against it, so a part damaged after it was written (even with its footer intact) is found.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vexport.errors import OutputExistsError, VexportError

log = logging.getLogger(__name__)

STATE_NAME = "run.json"
HASHES_NAME = "checksums.jsonl"
ERRORS_NAME = "errors.jsonl"
SUMMARY_NAME = "summary.json"
PART_GLOB = "part-*.parquet"
METADATA_KEY = b"vexport"
STATE_VERSION = 1
_PART = re.compile(r"^part-(\d{12})-(\d{12})\.parquet$")
_OURS = re.compile(r"^(part-\d{12}-\d{12}\.parquet|errors\.jsonl|summary\.json|run\.json|checksums\.jsonl"
                   r"|\..*\.tmp)$")


def _temporary(name: str) -> bool:
    """A file this module writes under a hidden name and renames when complete (a kill can leave one)."""
    return name.startswith(".") and name.endswith(".tmp")


def part_name(start: int, stop: int) -> str:
    return f"part-{start:012d}-{stop:012d}.parquet"


@dataclass(frozen=True)
class PartInfo:
    """What a committed part says about its window."""

    start: int
    stop: int
    scored: int
    rejected: int
    tokens: int
    slots: int
    errors: tuple[dict, ...] = ()


class OutputFolder:
    """Checks (fresh, forced or resumed) and then writes the output folder of one scoring run."""

    def __init__(self, path: Path, state: dict, fresh: bool):
        self.path, self.state, self.fresh = path, state, fresh
        self.started = self.created = False
        self.committed = 0  # parts this run committed

    @classmethod
    def open(cls, path: str | Path, state: dict, *, resume: bool, force: bool) -> "OutputFolder":
        """Check the folder against STATE (--resume) or that it may be started afresh: new, empty, or (--force) a
        previous score output. Nothing is written here; see start()."""
        path = Path(path).expanduser().absolute()
        if path.exists() and not path.is_dir():
            raise VexportError(f"--output {path} exists and is not a folder")
        entries = sorted(e.name for e in path.iterdir() if not _temporary(e.name)) if path.is_dir() else []
        has_state = (path / STATE_NAME).is_file()
        if not entries:
            return cls(path, state, fresh=True)
        if resume:
            if not has_state:
                raise OutputExistsError(f"--resume: --output {path} is not empty and has no {STATE_NAME}: "
                                        "not a vexport score output (pass --force to replace it)")
            _check_state(path, state)
            folder = cls(path, state, fresh=False)
            folder._verify_parts()
            return folder
        if not force:
            raise OutputExistsError(f"--output {path} is not empty "
                                    "(pass --resume to continue it or --force to replace it)")
        if not has_state:
            raise OutputExistsError(f"--force: --output {path} is not a vexport score output (it holds "
                                    f"{entries[0]!r} and no {STATE_NAME}): refusing to replace it; --force replaces "
                                    "only a previous score output or an empty folder")
        return cls(path, state, fresh=True)

    def start(self) -> None:
        """Make the folder this run's, once: a fresh run clears a previous output's files (only those this module
        writes) and writes run.json; a resumed one removes what a killed run left half-written."""
        if self.started:
            return
        if self.fresh:
            self.created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            self._remove(lambda name: bool(_OURS.match(name)))
            _write_json(self.path / STATE_NAME, self.state)
        else:
            self._remove(_temporary)
            self._rewrite_hashes()  # whole lines only: a kill can leave the last one torn
        self.started = True

    def abandon(self) -> None:
        """After a failed run: a fresh folder that got no part is put back as it was (no run.json, no errors.jsonl,
        and removed if this run created it), so a plain rerun is not refused as "not empty"."""
        if not (self.started and self.fresh and not self.committed):
            return
        self._remove(lambda name: bool(_OURS.match(name)))
        if self.created and not any(self.path.iterdir()):
            self.path.rmdir()
        self.started = False

    def done(self) -> set[int]:
        """Starts of the windows that already have a part this run keeps (none when starting afresh)."""
        return set() if self.fresh else {p.start for p in self.parts()}

    def _verify_parts(self) -> None:
        """--resume: every part must still be the file whose sha256 run.json recorded when it was written."""
        recorded = recorded_hashes(self.path)
        for file in sorted(self.path.glob(PART_GLOB)):
            if _PART.match(file.name) and file.name in recorded:
                _verify_part(file, recorded[file.name], "--resume: ")

    def _remove(self, which) -> None:
        for entry in self.path.iterdir():
            if entry.is_file() and which(entry.name):
                entry.unlink()

    def parts(self) -> Iterator[PartInfo]:
        """Every committed part, in row order (only the footers are read)."""
        import pyarrow.parquet as pq

        if not self.path.is_dir():
            return
        for file in sorted(self.path.glob(PART_GLOB)):
            if not _PART.match(file.name):
                continue
            try:
                meta = json.loads(pq.read_schema(file).metadata[METADATA_KEY])
            except Exception as exc:  # pyarrow raises several types for a damaged file
                raise VexportError(f"{file}: not a readable scoring part ({' '.join(str(exc).split())}); "
                                   "remove it and run again with --resume") from None
            yield PartInfo(meta["start"], meta["stop"], meta["scored"], meta["rejected"], meta["tokens"],
                           meta["slots"], tuple(meta["errors"]))

    def commit(self, start: int, stop: int, table) -> PartInfo:
        """Write the window's part (scored rows; rejected rows in its metadata), record its sha256 in run.json,
        rename it into place and append its errors."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        self.start()
        rejected = table.filter(pc.is_valid(table["error"]))
        scored = table.filter(pc.is_null(table["error"]))
        info = PartInfo(start, stop, scored.num_rows, rejected.num_rows,
                        int(pc.sum(scored["num_tokens"]).as_py() or 0), int(pc.sum(scored["slots"]).as_py() or 0),
                        tuple({"row": r, "reason": e} for r, e in zip(rejected["row"].to_pylist(),
                                                                      rejected["error"].to_pylist())))
        part = scored.drop_columns(["error", "slots"])
        part = part.replace_schema_metadata({METADATA_KEY: json.dumps(info.__dict__)})
        sink = pa.BufferOutputStream()
        pq.write_table(part, sink)
        data = sink.getvalue().to_pybytes()
        name = part_name(start, stop)
        tmp = self.path / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        record = {"part": name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "rows": part.num_rows}
        with open(self.path / HASHES_NAME, "a", encoding="utf-8") as fh:  # first: a part on disk has its record
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path / name)
        self.committed += 1
        self._append_errors(info.errors)
        return info

    def _append_errors(self, errors) -> None:
        if errors:
            with open(self.path / ERRORS_NAME, "a", encoding="utf-8") as fh:
                fh.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in errors)

    def _rewrite_hashes(self) -> None:
        records = recorded_hashes(self.path)
        if records or (self.path / HASHES_NAME).exists():
            tmp = self.path / f".{HASHES_NAME}.{uuid.uuid4().hex[:8]}.tmp"
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records.values()), encoding="utf-8")
            os.replace(tmp, self.path / HASHES_NAME)

    def rebuild_errors(self) -> None:
        """errors.jsonl from the committed parts, in row order, replaced atomically."""
        tmp = self.path / f".{ERRORS_NAME}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            for info in self.parts():
                fh.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in info.errors)
        os.replace(tmp, self.path / ERRORS_NAME)

    def write_summary(self, summary: dict) -> Path:
        return _write_json(self.path / SUMMARY_NAME, summary)


def _check_state(path: Path, state: dict) -> None:
    """The run.json of PATH must record the same input, model (weights and tokenizer/config files) and options
    as STATE."""
    try:
        old = json.loads((path / STATE_NAME).read_text())
    except (OSError, ValueError) as exc:
        raise VexportError(f"--resume: {path / STATE_NAME} is not readable JSON ({exc})") from None
    if not isinstance(old, dict):
        raise VexportError(f"--resume: {path / STATE_NAME} is not a JSON object")
    for key, what in (("input", "a different input"), ("model", "a different model"),
                      ("options", "different options")):
        before = old.get(key) if isinstance(old.get(key), dict) else {}
        if before.get("sha256") != state[key]["sha256"]:
            raise VexportError(f"--resume: {path} was scored with {what} "
                               f"({_differences(before, state[key])}); use a new --output or --force")
    changed = _changed_files(old["model"].get("files"), state["model"].get("files"))  # a dict: sha256 matched
    if changed:
        raise VexportError(f"--resume: {path} was scored with other model files ({changed}): rows would mix two "
                           "tokenisations; use a new --output or --force")


def _changed_files(before: dict | None, now: dict | None) -> str:
    """Which of the model's config, tokenizer and chat template files differ ("" when none, or not recorded)."""
    if not isinstance(before, dict) or not isinstance(now, dict):
        return ""  # a run.json from before these files were recorded: only the weights were compared
    names = sorted(n for n in set(before) | set(now) if before.get(n) != now.get(n))
    return "; ".join(f"{n} {'changed' if n in before and n in now else 'added' if n in now else 'removed'}"
                     for n in names)


def recorded_hashes(folder: Path) -> dict[str, dict]:
    """{part name: its record} from checksums.jsonl (the last record of a name wins; a torn line is skipped)."""
    records: dict[str, dict] = {}
    try:
        lines = (folder / HASHES_NAME).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return records  # none yet, or an output written before parts were hashed
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("part"), str):
            records[record["part"]] = record
    return records


def _verify_part(file: Path, record: Any, prefix: str = "") -> bytes:
    """FILE's bytes, which must have the sha256 run.json recorded when the part was written."""
    data = file.read_bytes()
    expected = record.get("sha256") if isinstance(record, dict) else None
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise VexportError(f"{prefix}{file} does not match the sha256 recorded in {HASHES_NAME} when it was written "
                           "(damaged since): remove it and run again with --resume")
    return data


def read_scores(output: str | Path):
    """Every scored row of an output folder as one pyarrow Table, sorted by row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(p for p in Path(output).glob(PART_GLOB) if _PART.match(p.name))
    if not files:
        raise VexportError(f"{output} has no scoring parts ({PART_GLOB})")
    recorded = recorded_hashes(Path(output))  # none for parts copied without it: pyarrow's own checks remain
    tables = []
    for file in files:
        data = _verify_part(file, recorded.get(file.name))
        try:
            tables.append(pq.read_table(pa.BufferReader(data)).replace_schema_metadata(None))
        except Exception as exc:  # pyarrow raises OSError, ArrowInvalid, ... for a damaged file
            raise VexportError(f"{file}: not a readable scoring part ({' '.join(str(exc).split())[:200]})") from None
    return pa.concat_tables(tables).sort_by("row")


def read_errors(output: str | Path) -> list[dict]:
    path = Path(output) / ERRORS_NAME
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _write_json(path: Path, data: Any) -> Path:
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    return path


def _differences(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if k not in ("sha256", "files") and old.get(k) != new.get(k))
    if not keys:
        return f"sha256 {str(old.get('sha256'))[:12]} then, {str(new.get('sha256'))[:12]} now"
    return "; ".join(f"{k} {old.get(k)!r} then, {new.get(k)!r} now" for k in keys[:3])
