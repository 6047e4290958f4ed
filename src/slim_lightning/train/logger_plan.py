"""The ``logger`` group of ``train.py``, validated (a Lightning logger ``_target_`` node and the
project's ``slim_`` extras); ``app.train_run.build_loggers`` instantiates it."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, check_bool

HYDRA_KEYS = ("_target_", "_args_", "_recursive_", "_convert_", "_partial_")
LOGGER_EXTRAS = ("slim_log_artifact",)  # project keys, popped before instantiation
LOGGER_HINT = (
    "a Lightning logger class, e.g. lightning.pytorch.loggers.CSVLogger "
    "(conf/logger/*.yaml: wandb, csv, none)"
)


@dataclass(frozen=True)
class LoggerConfig:
    """The ``logger`` group, validated: a Lightning logger ``_target_`` node and project extras.

    Attributes:
        node: the ``_target_`` node without its ``slim_`` keys (None: ``logger=none``, no logger).
            ``train_run.build_loggers`` instantiates it with ``save_dir`` defaulting to the run
            directory; for wandb also ``name`` (default: the run directory's name), ``offline``
            (``auto``: see :func:`resolved_offline`) and ``log_model=False``.
        log_artifact: ``slim_log_artifact``: upload the final packed checkpoint as a wandb
            artifact.
    """

    node: dict[str, Any] | None = None
    log_artifact: bool = False


def resolved_offline(offline: bool | str) -> bool:
    """wandb's ``offline``: ``auto`` is online only when WANDB_API_KEY is set or
    WANDB_MODE=online; true / false as given."""
    if offline != "auto":
        return bool(offline)
    mode = os.environ.get("WANDB_MODE", "")
    return not (os.environ.get("WANDB_API_KEY") or mode == "online")


def logger_class(target: Any) -> type:
    """The Lightning logger class named by ``logger._target_`` (ConfigError otherwise)."""
    import importlib

    from lightning.pytorch.loggers import Logger

    module, _, name = str(target).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except Exception as e:  # missing module or class
        raise ConfigError("logger._target_", target, f"{LOGGER_HINT} ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, Logger)):
        raise ConfigError("logger._target_", target, LOGGER_HINT)
    return cls


def logger_keywords(cls: type) -> set[str] | None:
    """The keywords ``cls`` accepts (None: any, its ``**kwargs`` go somewhere unknown).

    ``WandbLogger`` passes its ``**kwargs`` to ``wandb.init``, whose keywords count too.
    """
    from lightning.pytorch.loggers import WandbLogger

    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # without self
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if not any(p.kind == p.VAR_KEYWORD for p in params):
        return names
    if issubclass(cls, WandbLogger):
        try:
            import wandb
        except ImportError:
            return None
        return names | set(inspect.signature(wandb.init).parameters)
    return None


def build_logger_config(values: dict[str, Any] | None) -> LoggerConfig:
    """Validates the ``logger`` node: known ``slim_`` extras, an importable Lightning logger
    ``_target_``, only keywords its constructor takes, and wandb's ``offline``."""
    values = dict(values or {})
    extras = {k: values.pop(k) for k in list(values) if k.startswith("slim_")}
    for k, v in extras.items():
        if k not in LOGGER_EXTRAS:
            raise ConfigError(f"logger.{k}", v, "project keys " + ", ".join(LOGGER_EXTRAS))
        check_bool(f"logger.{k}", v)
    log_artifact = extras.get("slim_log_artifact", False)
    target = values.get("_target_")
    if target is None:
        for k, v in values.items():
            if k not in HYDRA_KEYS:
                hint = f"keys of a logger node with a _target_ (this one has none): {LOGGER_HINT}"
                raise ConfigError(f"logger.{k}", v, hint)
        return LoggerConfig(None, log_artifact)
    from lightning.pytorch.loggers import WandbLogger

    cls = logger_class(target)
    keywords = logger_keywords(cls)
    if keywords is not None:
        for k, v in values.items():
            if k not in HYDRA_KEYS and k not in keywords:
                allowed = ", ".join(sorted(keywords) + list(LOGGER_EXTRAS))
                raise ConfigError(f"logger.{k}", v, f"keys of {target}: {allowed}")
    if issubclass(cls, WandbLogger) and values.get("offline", "auto") not in ("auto", True, False):
        raise ConfigError("logger.offline", values["offline"], "auto, true, false")
    return LoggerConfig(values, log_artifact)
