"""The runtime layer: the compressed ``nn.Module`` s a compressed model is made of (torch only).

``functional`` (autograd functions) <- ``linear`` (``SLiMLinear``) <- ``backend`` (model-wide
switches), ``embedding`` (``PackedEmbedding``), ``adapters`` (what trains, merging).
"""

from .backend import set_backend, set_dense_cache
from .embedding import PackedEmbedding
from .linear import SLiMLinear

__all__ = ["PackedEmbedding", "SLiMLinear", "set_backend", "set_dense_cache"]
