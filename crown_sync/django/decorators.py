"""``leader_only``: the view runs on the leader; a follower answers 503 + Retry-After, or 307 to
the leader's URL from its metadata (``CROWN_SYNC["FOLLOWER"] = "redirect"``)."""

import functools
from typing import Any

from asgiref.sync import iscoroutinefunction, sync_to_async
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse

from . import runtime
from .conf import config

__all__ = ["leader_only", "follower_response"]


def follower_response(request: HttpRequest) -> HttpResponse:
    """What a follower answers instead of a ``leader_only`` view. May read the oracle (redirect
    only, cached for ``LEADER_CACHE`` seconds)."""
    settings = config()
    if settings.follower == "redirect":
        url = runtime.leader_url()
        if url is not None and url.rstrip("/") != request.build_absolute_uri("/").rstrip("/"):
            response = HttpResponseRedirect(url.rstrip("/") + request.get_full_path())
            response.status_code = 307  # 307: the same method and body, at the leader
            return response
    response = JsonResponse({"error": "not the leader", "name": settings.name}, status=503)
    response["Retry-After"] = str(int(round(settings.retry_after)))
    return response


async def _async_follower_response(request: HttpRequest) -> HttpResponse:
    if config().follower == "redirect":
        # The leader's URL may come from the oracle: not on the event loop's thread.
        return await sync_to_async(follower_response, thread_sensitive=False)(request)
    return follower_response(request)


def _request_in(args) -> HttpRequest:
    # A function view gets the request first; a view method (get, post, dispatch) gets self first.
    for arg in args[:2]:
        if isinstance(arg, HttpRequest):
            return arg
    raise TypeError("leader_only: the decorated view was not called with an HttpRequest")


def _decorate_class(view_class: type) -> type:
    from django.views import View

    if not issubclass(view_class, View):
        raise TypeError(f"leader_only decorates views: {view_class.__name__} is not a django.views.View")
    dispatch = view_class.dispatch

    @functools.wraps(dispatch)
    def leader_only_dispatch(self, request, *args, **kwargs):
        if runtime.is_leader():
            return dispatch(self, request, *args, **kwargs)
        if self.view_is_async:
            return _async_follower_response(request)  # as_view() awaits what dispatch returns
        return follower_response(request)

    view_class.dispatch = leader_only_dispatch
    return view_class


def leader_only(view: Any) -> Any:
    """Run ``view`` only where :func:`crown_sync.is_leader` is True for ``CROWN_SYNC["NAME"]``.

    Decorates a function view, an ``async def`` view, a class-based view (the class itself, sync
    or async handlers), a view method (``get``, ``post``, with ``method_decorator`` or without) or
    what ``as_view()`` returns. Elsewhere: 503 + ``Retry-After``, or 307 to the leader's URL.
    """
    if isinstance(view, type):
        return _decorate_class(view)
    if not callable(view):
        raise TypeError(f"leader_only decorates views, not {type(view).__name__}")
    if iscoroutinefunction(view):

        @functools.wraps(view)
        async def async_wrapper(*args, **kwargs):
            if runtime.is_leader():
                return await view(*args, **kwargs)
            return await _async_follower_response(_request_in(args))

        return async_wrapper

    # method_decorator(leader_only, name="dispatch") passes a partial of the bound dispatch: in
    # an async class-based view, dispatch must return something as_view() can await.
    instance = getattr(getattr(view, "func", None), "__self__", None)
    returns_awaitable = bool(getattr(instance, "view_is_async", False))

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        if runtime.is_leader():
            return view(*args, **kwargs)
        if returns_awaitable:
            return _async_follower_response(_request_in(args))
        return follower_response(_request_in(args))

    return wrapper

