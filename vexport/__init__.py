"""vexport: export RLHF value models to fast formats and prove the values did not change."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
