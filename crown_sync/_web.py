"""What the web integrations (Flask, Django) share: the body of their status endpoint."""

import os
import time
from typing import Any, Callable, Dict, Hashable, Optional

from . import registry
from .api import known_leaders
from .gunicorn import leader_token, master_view
from .oracle import Leader

__all__ = ["leader_summary", "status_body", "local_crown", "LeaderReads"]


def leader_summary(leader: Optional[Leader]) -> Optional[Dict[str, Any]]:
    if leader is None:
        return None
    # Identity, token and since only: metadata may hold whatever the leader chose to publish.
    return {"identity": leader.identity, "token": leader.token, "since": leader.since}


def local_crown(name: str, own_crown=None):
    """``own_crown`` (the integration's own), else a crown of ``name`` started in this process
    (a Gunicorn worker's, one of the program's: the leading one if any), else None."""
    if own_crown is not None:
        return own_crown
    crowns = registry.crowns(name)
    return next((crown for crown in crowns if crown.is_leader()), crowns[-1] if crowns else None)


class LeaderReads:
    """How a web integration answers "who leads ``name``": from a crown in this process, else
    from the Gunicorn master that runs the crown (shared memory), else from the oracle, read at
    most once per ``max_age`` seconds for the same ``key`` (the settings it was read with)."""

    def __init__(self):
        self._cached = (-float("inf"), None, None)  # (monotonic time, key, Leader or exception)

    def leader(self, name: str, own_crown, find_leader: Callable[[], Optional[Leader]], max_age: float,
               key: Hashable = None) -> Optional[Leader]:
        local = own_crown.leader() if own_crown is not None else known_leaders().get(name)
        if local is not None:
            return local
        master = master_view(name) if local_crown(name, own_crown) is None else None
        if master is not None:
            return master.leader
        when, cached_key, cached = self._cached
        if cached_key == key and time.monotonic() - when < max_age:
            if isinstance(cached, Exception):
                raise cached
            return cached
        try:
            found = find_leader()
        except Exception as exc:
            # Cached too: an unreachable oracle must not make every request wait for it.
            self._cached = (time.monotonic(), key, exc)
            raise
        self._cached = (time.monotonic(), key, found)
        return found


def status_body(name: str, own_crown, leading: bool, read_leader: Callable[[], Optional[Leader]]) -> Dict[str, Any]:
    """``name``, ``is_leader``, ``token``, ``pid``, ``phase`` and ``leader``.

    ``phase`` is that of the crown in this process (``own_crown``, else any of that name), else,
    in a Gunicorn worker whose master runs the crown, the master's; ``leader`` is then the one
    the master knows (shared memory: no I/O); otherwise ``read_leader()``'s. ``error`` names the
    type of the oracle's error only (its message may name hosts), with ``leader`` None when the
    oracle could not be read.
    """
    crown = local_crown(name, own_crown)
    master = master_view(name) if crown is None else None
    body: Dict[str, Any] = {
        "name": name,
        "is_leader": leading,
        "token": leader_token(name) if leading else None,
        "pid": os.getpid(),
        "phase": crown.phase if crown is not None else (master.phase if master is not None else None),
    }
    if master is not None:
        body["leader"] = leader_summary(master.leader)
        if master.error is not None:
            body["error"] = f"oracle unavailable ({master.error})"
        return body
    try:
        body["leader"] = leader_summary(read_leader())
    except Exception as exc:
        body["leader"] = None
        body["error"] = f"oracle unavailable ({type(exc).__name__})"
    return body
