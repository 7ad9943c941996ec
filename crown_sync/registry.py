"""The crowns started in this process, by name (for crown_sync.is_leader(name) and friends).

A crown is listed from start() until its loop has stopped. A forked child starts with an empty
registry: crowns inherited across fork() are not its own.
"""

import os
import threading
from typing import List

_lock = threading.Lock()
_crowns: List[object] = []


def register(crown) -> None:
    with _lock:
        if crown not in _crowns:
            _crowns.append(crown)


def unregister(crown) -> None:
    with _lock:
        if crown in _crowns:
            _crowns.remove(crown)


def crowns(name=None) -> List[object]:
    with _lock:
        return [c for c in _crowns if name is None or c.name == name]


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()
    _crowns.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
