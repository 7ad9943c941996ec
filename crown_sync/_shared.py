"""One oracle per process and URL: the crowns of a process built from the same URL share it.

``Crown(name, oracle="zookeeper://...")`` (or ``oracle=None``: ``$CROWN_SYNC_ORACLE`` or the
embedded file oracle) takes its oracle from this registry instead of building its own, so a
process holds one ZooKeeper session per URL, not one per crown. The key is the URL string exactly
as given: two spellings of the same server (options in another order, a trailing ``/``) make two
oracles, which costs a second connection, never a wrong merge of different options.

Each :func:`acquire` takes a reference and each :func:`release` drops one; the last release closes
the oracle (outside the registry's lock: a close may wait for a frozen server within its bound).
An oracle object passed to a crown by its user never enters the registry. A forked child starts
with an empty registry: the parent's oracles (their sockets blinded by :mod:`._forksafe`) are the
parent's, and crowns the child inherited never release them.
"""

import threading
from typing import Any, Dict, Hashable, List, Optional, Tuple

from . import _forksafe
from .urls import default_oracle, default_oracle_url, oracle_from_url

__all__ = ["acquire", "release", "shared"]

_lock = threading.Lock()
_entries: Dict[Hashable, list] = {}  # key -> [oracle, references]


def _forget() -> None:
    global _lock
    _lock = threading.Lock()  # a thread of the parent may have held it across the fork
    _entries.clear()


_forksafe.at_fork(after_in_child=_forget)


def acquire(url: Optional[str]) -> Tuple[Hashable, Any]:
    """(key, oracle) for ``url`` (None: the process default), shared with every other holder
    of the same key; build it if none is held. Errors of a bad URL are raised, nothing kept."""
    _forksafe.check_process()  # forked without Python's at-fork handlers (uWSGI): forget first
    if url is None:
        url = default_oracle_url()
    key: Hashable = ("url", url) if url is not None else ("default",)
    with _lock:
        entry = _entries.get(key)
        if entry is None:
            # Building does no I/O (oracles connect lazily), so holding the lock is cheap.
            oracle = oracle_from_url(url) if url is not None else default_oracle()
            entry = _entries[key] = [oracle, 0]
        entry[1] += 1
        return key, entry[0]


def release(key: Hashable, oracle: Any) -> bool:
    """Drop one reference to ``oracle``; close it with the last one. True if it was closed.

    An oracle that is not (or no longer) the registry's entry for ``key`` (it came from before a
    fork) is left alone."""
    with _lock:
        entry = _entries.get(key)
        if entry is None or entry[0] is not oracle:
            return False
        entry[1] -= 1
        if entry[1] > 0:
            return False
        del _entries[key]
    oracle.close()
    return True


def shared() -> List[Tuple[Any, int]]:
    """What the registry holds now: (oracle, references) pairs. For tests and diagnostics (the
    keys are left out: a URL may hold a password)."""
    with _lock:
        return [(entry[0], entry[1]) for entry in _entries.values()]
