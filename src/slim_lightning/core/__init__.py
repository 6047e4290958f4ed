"""Pure-torch compression core.

Importing any ``slim_lightning.core`` module imports the method modules below, so the
registries in ``core.registry`` (pruners, quantisers, adapter methods) are always complete.
"""

from slim_lightning.core import (  # noqa: F401  (registration)
    lowrank,
    prune,
    quant,
    slim_llm,
    sparsegpt,
    spqr,
)
