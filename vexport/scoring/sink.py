"""The output folder of a scoring run: Parquet parts, errors.jsonl, run.json (hashes for resume), summary.json.

Each part holds the scored rows of one input window, ``part-{start:012d}-{stop:012d}.parquet``, and is written
to a hidden temporary name and renamed when complete, so a part is either whole or absent. The window's
rejected rows and counts travel in the part's own metadata, so one rename commits everything about the
window; errors.jsonl is appended as parts commit and rebuilt from the parts at the start and end of every run.
Part names come from the input plan, so a window scored twice (a resumed run) replaces itself: no row can
appear twice, and a resumed run scores exactly the windows that have no part.
"""

from __future__ import annotations

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
ERRORS_NAME = "errors.jsonl"
SUMMARY_NAME = "summary.json"
PART_GLOB = "part-*.parquet"
METADATA_KEY = b"vexport"
STATE_VERSION = 1
_PART = re.compile(r"^part-(\d{12})-(\d{12})\.parquet$")
_OURS = re.compile(r"^(part-\d{12}-\d{12}\.parquet|errors\.jsonl|summary\.json|run\.json|\..*\.tmp)$")


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
    """Opens (fresh, forced or resumed) and writes the output folder of one scoring run."""

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def open(cls, path: str | Path, state: dict, *, resume: bool, force: bool) -> "OutputFolder":
        """Check the folder against STATE (--resume) or start it afresh (new, empty, or --force)."""
        folder = cls(Path(path).expanduser().absolute())
        if folder.path.exists() and not folder.path.is_dir():
            raise VexportError(f"--output {folder.path} exists and is not a folder")
        has_files = folder.path.is_dir() and any(not _temporary(e.name) for e in folder.path.iterdir())
        if resume and has_files:
            if not (folder.path / STATE_NAME).is_file():
                raise OutputExistsError(f"--resume: --output {folder.path} is not empty and has no {STATE_NAME}: "
                                        "not a vexport score output (pass --force to replace it)")
            folder._check_state(state)
            folder._remove(_temporary)
        elif has_files and not force:
            raise OutputExistsError(f"--output {folder.path} is not empty "
                                    "(pass --resume to continue it or --force to replace it)")
        else:
            folder.path.mkdir(parents=True, exist_ok=True)
            folder._remove(lambda name: bool(_OURS.match(name)))
            _write_json(folder.path / STATE_NAME, state)
        folder.rebuild_errors()
        return folder

    def _check_state(self, state: dict) -> None:
        try:
            old = json.loads((self.path / STATE_NAME).read_text())
        except (OSError, ValueError) as exc:
            raise VexportError(f"--resume: {self.path / STATE_NAME} is not readable JSON ({exc})") from None
        for key, what in (("input", "a different input"), ("model", "a different model"),
                          ("options", "different options")):
            if old.get(key, {}).get("sha256") != state[key]["sha256"]:
                raise VexportError(f"--resume: {self.path} was scored with {what} "
                                   f"({_differences(old.get(key, {}), state[key])}); use a new --output or --force")

    def _remove(self, which) -> None:
        for entry in self.path.iterdir():
            if entry.is_file() and which(entry.name):
                entry.unlink()

    def parts(self) -> Iterator[PartInfo]:
        """Every committed part, in row order (only the footers are read)."""
        import pyarrow.parquet as pq

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
        """Write the window's part (scored rows; rejected rows in its metadata) and append its errors."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        rejected = table.filter(pc.is_valid(table["error"]))
        scored = table.filter(pc.is_null(table["error"]))
        info = PartInfo(start, stop, scored.num_rows, rejected.num_rows,
                        int(pc.sum(scored["num_tokens"]).as_py() or 0), int(pc.sum(scored["slots"]).as_py() or 0),
                        tuple({"row": r, "reason": e} for r, e in zip(rejected["row"].to_pylist(),
                                                                      rejected["error"].to_pylist())))
        part = scored.drop_columns(["error", "slots"])
        part = part.replace_schema_metadata({METADATA_KEY: json.dumps(info.__dict__)})
        tmp = self.path / f".{part_name(start, stop)}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as fh:
            pq.write_table(part, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path / part_name(start, stop))
        self._append_errors(info.errors)
        return info

    def _append_errors(self, errors) -> None:
        if errors:
            with open(self.path / ERRORS_NAME, "a", encoding="utf-8") as fh:
                fh.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in errors)

    def rebuild_errors(self) -> None:
        """errors.jsonl from the committed parts, in row order, replaced atomically."""
        tmp = self.path / f".{ERRORS_NAME}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            for info in self.parts():
                fh.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in info.errors)
        os.replace(tmp, self.path / ERRORS_NAME)

    def write_summary(self, summary: dict) -> Path:
        return _write_json(self.path / SUMMARY_NAME, summary)


def read_scores(output: str | Path):
    """Every scored row of an output folder as one pyarrow Table, sorted by row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(p for p in Path(output).glob(PART_GLOB) if _PART.match(p.name))
    if not files:
        raise VexportError(f"{output} has no scoring parts ({PART_GLOB})")
    table = pa.concat_tables([pq.read_table(f).replace_schema_metadata(None) for f in files])
    return table.sort_by("row")


def read_errors(output: str | Path) -> list[dict]:
    path = Path(output) / ERRORS_NAME
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _write_json(path: Path, data: Any) -> Path:
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    return path


def _differences(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if k != "sha256" and old.get(k) != new.get(k))
    if not keys:
        return f"sha256 {str(old.get('sha256'))[:12]} then, {str(new.get('sha256'))[:12]} now"
    return "; ".join(f"{k} {old.get(k)!r} then, {new.get(k)!r} now" for k in keys[:3])
