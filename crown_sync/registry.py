"""The crowns started in this process, by name (for crown_sync.is_leader(name) and friends).

A crown is listed from start() until its loop has stopped. A forked child starts with an empty
registry: crowns inherited across fork() are not its own (the list records the pid it was made
in, so this holds also where no at-fork hook runs: uWSGI forks its workers from C).

Leadership providers ("remote truth"): ``add_provider(fn)`` registers ``fn(name) -> bool``, asked
by :func:`crown_sync.is_leader` when no crown of that name in this process leads. A provider must
answer at once, without I/O, and only True when it knows this host leads right now (for example
:mod:`crown_sync.gunicorn` reads a deadline that the Gunicorn master's crown keeps in shared
memory). Providers are kept across fork() on purpose: they exist for the processes forked from
the one that runs the crown. One that raises is logged and counts as False.
"""

import logging
import os
import threading
from typing import Callable, List

from . import _forksafe

_lock = threading.Lock()
_crowns: List[object] = []
_providers: List[Callable[[str], bool]] = []
_pid = os.getpid()  # the process _crowns belongs to


def _mine() -> None:
    _forksafe.check_process()  # forked without the at-fork hooks: catch up before the lock
    if _pid != os.getpid():
        _after_fork_in_child()


def register(crown) -> None:
    _mine()
    with _lock:
        if crown not in _crowns:
            _crowns.append(crown)


def unregister(crown) -> None:
    _mine()
    with _lock:
        if crown in _crowns:
            _crowns.remove(crown)


def crowns(name=None) -> List[object]:
    _mine()
    with _lock:
        return [c for c in _crowns if name is None or c.name == name]


def add_provider(provider: Callable[[str], bool]) -> None:
    """Register ``provider(name) -> bool`` for :func:`crown_sync.is_leader` (once; idempotent)."""
    if not callable(provider):
        raise TypeError("provider must be callable")
    _mine()
    with _lock:
        if provider not in _providers:
            _providers.append(provider)


def remove_provider(provider: Callable[[str], bool]) -> None:
    _mine()
    with _lock:
        if provider in _providers:
            _providers.remove(provider)


def provided_leader(name: str) -> bool:
    """True iff a registered provider says this host leads ``name``."""
    _mine()
    with _lock:
        providers = list(_providers)
    for provider in providers:
        try:
            if provider(name):
                return True
        except Exception:  # a provider must never break is_leader()
            logging.getLogger("crown_sync.registry").exception("leadership provider %r failed", provider)
    return False


def _after_fork_in_child() -> None:
    global _lock, _pid
    _lock = threading.Lock()
    _crowns.clear()
    _pid = os.getpid()


_forksafe.at_fork(after_in_child=_after_fork_in_child)
