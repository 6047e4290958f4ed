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


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_int(key: str, value: Any, lo: int, hi: int | None = None) -> None:
    """Raises ConfigError unless ``value`` is an integer in ``[lo, hi]`` (``hi`` None: no bound)."""
    if not _is_int(value) or value < lo or (hi is not None and value > hi):
        bound = f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}"
        raise ConfigError(key, value, bound)


def check_bool(key: str, value: Any) -> None:
    """Raises ConfigError unless ``value`` is a real bool (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise ConfigError(key, value, "true or false")


def make_dataclass(cls: type, group: str, values: dict) -> Any:
    """Builds dataclass ``cls`` from ``values``, naming the key of an unknown field."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    for k in values:
        if k not in names:
            raise ConfigError(f"{group}.{k}", values[k], "keys " + ", ".join(sorted(names)))
    return cls(**values)


class CheckpointError(ValueError):
    """A packed checkpoint is missing, damaged, edited or inconsistent (names the file)."""
