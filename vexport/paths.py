"""Where outputs may go: an output that is, holds or sits inside an input of the same command is refused.

`--force` replaces an output folder; it must never delete what the command reads. Paths are compared after
resolving symlinks and `..`, so `runs/m/..` and a link to the model folder are seen for what they are.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from .errors import VexportError


class OutputOverlapError(VexportError):
    """An output path is, contains or lies inside one of the command's inputs."""


def resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.fspath(path)))


def overlap(output: str | os.PathLike, source: str | os.PathLike) -> str | None:
    """How `output` overlaps `source` ("is", "contains", "is inside"), or None when they are apart."""
    out, src = resolved(output), resolved(source)
    if out == src:
        return "is"
    if out in src.parents:
        return "contains"
    if src in out.parents:
        return "is inside"
    return None


def refuse_overlap(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], *,
                   flag: str = "--output") -> None:
    """Raise OutputOverlapError when `output` is, contains or is inside any local input path."""
    for source in inputs:
        if source is None or not os.path.exists(source):
            continue                                   # a hub id or an absent path holds nothing to delete
        how = overlap(output, source)
        if how is not None:
            raise OutputOverlapError(f"{flag} {output} {how} the input {source}: refusing to write there "
                                     f"(--force never replaces or writes into an input)")
