"""What the web integrations (Flask, Django) share: the body of their status endpoint."""

import os
from typing import Any, Callable, Dict, Optional

from .gunicorn import leader_token
from .oracle import Leader

__all__ = ["leader_summary", "status_body"]


def leader_summary(leader: Optional[Leader]) -> Optional[Dict[str, Any]]:
    if leader is None:
        return None
    # Identity, token and since only: metadata may hold whatever the leader chose to publish.
    return {"identity": leader.identity, "token": leader.token, "since": leader.since}


def status_body(name: str, own_crown, leading: bool, read_leader: Callable[[], Optional[Leader]]) -> Dict[str, Any]:
    """``name``, ``is_leader``, ``token``, ``pid``, ``phase`` (of ``own_crown``, this process's
    own crown, or None) and ``leader`` read by ``read_leader`` (None and an ``error`` naming only
    the exception's type when the oracle can't be read: its message may name hosts)."""
    body: Dict[str, Any] = {
        "name": name,
        "is_leader": leading,
        "token": leader_token(name) if leading else None,
        "pid": os.getpid(),
        "phase": own_crown.phase if own_crown is not None else None,
    }
    try:
        body["leader"] = leader_summary(read_leader())
    except Exception as exc:
        body["leader"] = None
        body["error"] = f"oracle unavailable ({type(exc).__name__})"
    return body
