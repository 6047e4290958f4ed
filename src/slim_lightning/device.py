"""The one device resolver: ``auto`` -> ``cuda`` when available, else ``cpu``."""

from __future__ import annotations

from .errors import ConfigError


def resolve_device(device: str, key: str = "device") -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; refuses ``cuda*`` without CUDA.

    Raises:
        ConfigError: naming ``key`` when a CUDA device is asked for and none is visible.
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(key, device, "cpu or auto (no CUDA device is visible)")
    return device
