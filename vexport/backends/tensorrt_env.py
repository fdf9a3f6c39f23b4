"""The TensorRT environment: is TensorRT 10+ importable with a CUDA GPU, and what an engine is tied to.

A leaf: the engine builder (``export/tensorrt.py``) and the engine runner (``backends/tensorrt.py``) both ask
it, and it imports neither.
"""

from __future__ import annotations

from vexport.errors import MissingDependencyError

INSTALL_HINT = "pip install 'vexport[tensorrt]' (TensorRT 10 or newer) on a machine with an NVIDIA GPU and CUDA"


def require_tensorrt():
    """The tensorrt module, or a one-line MissingDependencyError saying what is missing and how to install it."""
    try:
        import tensorrt as trt
    except ImportError:
        raise MissingDependencyError(f"TensorRT is not installed (import tensorrt failed): {INSTALL_HINT}") from None
    if not hasattr(trt, "Builder") or int(str(trt.__version__).split(".")[0]) < 10:
        raise MissingDependencyError(f"tensorrt {getattr(trt, '__version__', '?')} is not TensorRT 10+: {INSTALL_HINT}")
    import torch

    if not torch.cuda.is_available():
        raise MissingDependencyError(f"TensorRT needs a CUDA GPU and torch sees none: {INSTALL_HINT}")
    return trt


def gpu_identity(device_index: int = 0) -> dict[str, str]:
    """What an engine is tied to: the GPU's name and compute capability, and the TensorRT version."""
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability(device_index)
    return {"gpu": torch.cuda.get_device_name(device_index), "compute_capability": f"{major}.{minor}",
            "tensorrt_version": trt.__version__}
