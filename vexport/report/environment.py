"""The machine a comparison ran on: device name, platform, core and thread counts, library versions."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

from vexport.manifest import library_versions

_REPORT_PACKAGES = ("numpy", "scipy", "matplotlib", "jinja2")  # versions the report adds to the manifest's list


def environment(device: torch.device) -> dict[str, Any]:
    """The machine and library versions a comparison ran with."""
    from importlib import metadata

    versions = library_versions()
    for name in _REPORT_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {"device": device_name(device), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), **versions}


def device_name(device: torch.device) -> str:
    """'cuda: NVIDIA H100 80GB HBM3' or 'cpu: <model name> (N logical cores)'."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{device.type}: {model} ({os.cpu_count()} logical cores)"
