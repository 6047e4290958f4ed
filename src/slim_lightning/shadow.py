"""``import kernels`` (Hugging Face's hub-kernels package, imported by bitsandbytes and
transformers) must never resolve to this repository's top-level ``kernels/`` folder (our Triton
kernels, installed as ``slim_lightning.kernels``), which shadows it whenever the repository root
is on ``sys.path`` (running ``python compress.py`` or ``python -m pytest`` from a checkout).

``guard()`` (called on ``import slim_lightning``) puts a finder first on ``sys.meta_path`` that,
for the top-level name ``kernels`` only, searches ``sys.path`` without the checkout's root: the
real package when installed, else an empty namespace module without a version or ``__file__``,
which transformers reads as "not installed" and bitsandbytes' ``from kernels import get_kernel``
rejects like a missing package. Installed from a wheel there is no such folder and nothing is
done.
"""

from __future__ import annotations

import importlib.machinery
import sys
from pathlib import Path
from typing import Any

NAME = "kernels"


def _checkout_root() -> Path | None:
    root = Path(__file__).resolve().parents[2]
    return root if (root / NAME / "sparse24.py").is_file() else None


def _resolves_to(entry: str, root: Path) -> bool:
    try:
        return Path(entry or ".").resolve() == root
    except (OSError, RuntimeError):
        return False


class _HubKernelsFinder:
    def __init__(self, root: Path):
        self.root = root

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != NAME:
            return None
        entries = [p for p in sys.path if isinstance(p, str) and not _resolves_to(p, self.root)]
        spec = importlib.machinery.PathFinder.find_spec(fullname, entries, target)
        if spec is not None:
            return spec
        if not any(_resolves_to(p, self.root) for p in sys.path if isinstance(p, str)):
            return None  # nothing of ours to hide: the normal "No module named" path
        return importlib.machinery.ModuleSpec(NAME, None, is_package=True)


def guard() -> None:
    root = _checkout_root()
    if root is None or any(isinstance(f, _HubKernelsFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _HubKernelsFinder(root))
