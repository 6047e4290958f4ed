"""Triton kernels for SLiM layers (imported as ``slim_lightning.kernels``).

* ``sparse24``: the kernels and their launchers (``slim24_matmul``, ``dense4_matmul``),
* ``reference``: their plain-PyTorch twins,
* ``ops``: the ``triton`` backend of ``SLiMLinear``,
* ``benchmark``: ``python -m slim_lightning.kernels.benchmark`` (see ``BENCHMARKS.md``).

Nothing is imported here, so importing the package does not import Triton.
"""

if __name__ == "kernels":
    # Started from a checkout, the repository root is on sys.path and this folder answers to
    # `import kernels`: Hugging Face's hub-kernels package (imported by transformers, peft and
    # bitsandbytes) has that name. Hand the name over to it, or to nobody, never to this folder.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))

    def _elsewhere(entry: object) -> bool:
        try:
            return isinstance(entry, str) and _os.path.realpath(entry or ".") != _root
        except (OSError, ValueError):
            return True

    _spec = _machinery.PathFinder.find_spec("kernels", [p for p in _sys.path if _elsewhere(p)])
    if _spec is None or _spec.loader is None:
        del _sys.modules["kernels"]
        raise ModuleNotFoundError(
            "No module named 'kernels' (this checkout's kernels/ folder is slim_lightning.kernels, "
            "not Hugging Face's package)",
            name="kernels",
        )
    _module = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds
    _spec.loader.exec_module(_module)
