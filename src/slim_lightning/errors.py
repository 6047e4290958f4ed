"""User-facing configuration errors."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A bad configuration value, reported with its key, the value and what is allowed.

    Raised before any heavy work starts, e.g.
    ``sparsity.pattern: got '3of4'; allowed: dense, nm, unstructured``.
    """

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}: got {value!r}; allowed: {allowed}")


def check_choice(key: str, value: Any, choices: tuple | list) -> None:
    """Raises ConfigError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(key, value, ", ".join(map(str, choices)))


def check_range(
    key: str, value: Any, lo: float, hi: float, *, lo_open=False, hi_open=False
) -> None:
    """Raises ConfigError unless ``lo <(=) value <(=) hi``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ConfigError(key, value, f"a number in {lb}{lo}, {hi}{rb}")
