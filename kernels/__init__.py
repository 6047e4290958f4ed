"""Triton kernels for SLiM layers (imported as ``slim_lightning.kernels``).

* ``sparse24``: the kernels and their launchers (``slim24_matmul``, ``dense4_matmul``),
* ``reference``: their plain-PyTorch twins,
* ``ops``: the ``triton`` backend of ``SLiMLinear``,
* ``benchmark``: ``python -m slim_lightning.kernels.benchmark`` (see ``BENCHMARKS.md``).

Nothing is imported here, so importing the package does not import Triton.
"""
