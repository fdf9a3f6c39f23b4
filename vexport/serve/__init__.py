"""Serve a value model over HTTP: ``vexport serve MODEL``, for RL trainers (OpenRLHF's ``/get_reward``),
vLLM clients (``/pooling``, ``/classify``) and vexport's own endpoints (values, shared-prompt groups, KV-cached
sessions), on FastAPI + uvicorn in one process or on Ray Serve replicas.

    HTTP ─► protocol.py (uvicorn, half-closed clients) ─► app.py (errors, auth.py's API key, metrics)
        ─► routes.py (openrlhf.py: /get_reward, vllm.py: /pooling, /classify) ─► inputs.py (tokenize and check)
        ─► engine: engine.py + batcher.py (local: one model thread)  |  ray_engine.py (Ray Serve replicas)
            ─► worker.py (ValueModel.values / score_group, the scoring planner) and sessions.py

``vexport.client.ValueClient`` is the matching client.
"""

from __future__ import annotations

import importlib.util

from vexport.errors import MissingDependencyError

__all__ = ["RAY_SERVE_INSTALL", "SERVE_INSTALL", "require_serve"]

SERVE_INSTALL = "pip install 'vexport[serve]'"
RAY_SERVE_INSTALL = "pip install 'vexport[serve,ray]'"
_SERVE_MODULES = ("fastapi", "uvicorn", "prometheus_client", "httpx")


def require_serve(engine: str = "local") -> None:
    """``vexport serve`` needs the serve extra (and Ray Serve for ``--engine ray``)."""
    missing = [name for name in _SERVE_MODULES if not _importable(name)]
    if missing:
        raise MissingDependencyError(f"vexport serve needs {', '.join(missing)}, which is not installed: "
                                     f"{SERVE_INSTALL}")
    if engine == "ray" and not _importable("ray.serve"):
        raise MissingDependencyError(f"--engine ray needs Ray Serve, which is not installed: {RAY_SERVE_INSTALL}")


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True
