"""One exception family. The CLI maps every VexportError to one line on stderr and exit code 2."""

from __future__ import annotations


class VexportError(Exception):
    """Bad input: the message is one line that names the file or flag at fault."""


class NotAValueModelError(VexportError):
    """The checkpoint is not a token-classification model with one label."""


class CorruptFileError(VexportError):
    """A weight or metadata file is truncated, corrupt or unreadable."""


class ManifestError(VexportError):
    """An artifact folder's manifest.json is missing, unreadable or from an incompatible version."""


class OutputExistsError(VexportError):
    """The output folder exists and --force was not given."""


class MissingDependencyError(VexportError):
    """An optional package (or hardware) the requested path needs is not present."""


class InputError(VexportError):
    """Impossible shapes or values passed to the API (too long a sequence, wrong dtype, ...)."""
