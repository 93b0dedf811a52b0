"""The passes a checkpoint can name: the registry, with the built-in passes loaded.

A recipe names each pass by its stable name (``"lora"``, ``"merge_lora"``, ...); a pass
class registers itself in :mod:`surgery.pass_base` when its module is imported. Loading a
checkpoint in a fresh process must find passes nobody imported yet, so the modules of the
``passes`` package are imported here (by name, as plugins: the core does not depend on
any one of them) before a name is looked up.
"""

from __future__ import annotations

import importlib
import pkgutil

import surgery.adapters.combine  # noqa: F401  (registers "combine_lora")
import surgery.adapters.delete  # noqa: F401  (registers "delete_adapter")
from surgery.pass_base import Pass, pass_class

__all__ = ["known_pass"]

_PLUGINS = "passes"


def known_pass(name: str) -> type[Pass]:
    """The pass class named ``name``, built-in passes included.

    Raises:
        ConfigError: no pass has that name (the message lists the nearest).
    """
    _load_plugins()
    return pass_class(name)


def _load_plugins() -> None:
    try:
        package = importlib.import_module(_PLUGINS)
    except ImportError:  # pragma: no cover - the package ships with the core
        return
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{_PLUGINS}.{info.name}")
