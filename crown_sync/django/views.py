"""The status view, for load balancers and people: ``path("_crown_sync/", include("crown_sync.django.urls"))``.

JSON with ``name``, ``is_leader``, ``token``, ``pid``, ``phase`` (of this process's own crown, or
None) and ``leader`` (identity, token, since: never metadata, never the oracle URL). With
``?require=leader`` a follower answers 503, for load balancers that send some traffic to the
leader only. The leader is read from the oracle at most once per ``LEADER_CACHE`` seconds.
"""

from django.http import JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from .._web import status_body
from . import runtime
from .conf import config

__all__ = ["status"]


@never_cache
@require_safe
def status(request):
    leading = runtime.is_leader()
    response = JsonResponse(status_body(config().name, runtime.crown(), leading, runtime.leader))
    if request.GET.get("require") == "leader" and not leading:
        response.status_code = 503
    return response
