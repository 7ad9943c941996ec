"""The oracles: one module each. Imported lazily so that optional client libraries are optional.

``crown_sync.oracles.PostgresOracle`` etc. import their module on first access.
"""

import importlib

from ..urls import SCHEMES, missing_library

__all__ = ["FileOracle", "PostgresOracle", "ZooKeeperOracle", "MemcachedOracle"]
__all__ += ["NatsOracle"]
__all__ += ["RedisOracle"]

_WHERE = {cls: (module, extra) for module, cls, extra in SCHEMES.values()}


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, extra = _WHERE[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise missing_library(name, exc, extra) from exc
    return getattr(module, name)
