"""The status view, for load balancers and people: ``path("_crown_sync/", include("crown_sync.django.urls"))``.

JSON with ``name``, ``is_leader``, ``token``, ``pid``, ``phase`` (of this process's own crown, or
None) and ``leader`` (identity, token, since: never metadata, never the oracle URL). With
``?require=leader`` a follower answers 503, for load balancers that send some traffic to the
leader only. The leader is read from the oracle at most once per ``LEADER_CACHE`` seconds.
"""

import os
from typing import Any, Dict, Optional

from django.http import JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from ..gunicorn import leader_token
from . import runtime
from .conf import config

__all__ = ["status"]


def _leader_dict(leader) -> Optional[Dict[str, Any]]:
    if leader is None:
        return None
    # Identity, token and since only: metadata may hold whatever the leader chose to publish.
    return {"identity": leader.identity, "token": leader.token, "since": leader.since}


@never_cache
@require_safe
def status(request):
    name = config().name
    own = runtime.crown()
    leading = runtime.is_leader()
    body: Dict[str, Any] = {
        "name": name,
        "is_leader": leading,
        "token": leader_token(name) if leading else None,
        "pid": os.getpid(),
        "phase": own.phase if own is not None else None,
    }
    try:
        body["leader"] = _leader_dict(runtime.leader())
    except Exception as exc:
        body["leader"] = None
        body["error"] = f"oracle unavailable ({type(exc).__name__})"  # no message: it may name hosts
    response = JsonResponse(body)
    if request.GET.get("require") == "leader" and not leading:
        response.status_code = 503
    return response
