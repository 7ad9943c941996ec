"""Django app: leadership in views, a status view, a management command, signals.

::

    # settings.py
    INSTALLED_APPS = [..., "crown_sync.django"]
    CROWN_SYNC = {"NAME": "scheduler", "ORACLE": "postgresql://app@db/app"}

    # views.py
    from crown_sync.django import leader_only

    @leader_only                 # followers answer 503 + Retry-After (or 307 to the leader)
    def reindex(request): ...

    # urls.py (opt-in status view for load balancers)
    path("_crown_sync/", include("crown_sync.django.urls"))

Where leadership comes from. The app starts nothing at import, in ``ready()`` or in a management
command (``ready()`` runs in ``migrate``, ``shell`` and the autoreloader's watcher too). It comes from
one of:

* :mod:`crown_sync.gunicorn` hooks in ``gunicorn.conf.py``, unchanged (the crown in the master,
  answered in every worker through shared memory; or one crown per worker);
* any :class:`crown_sync.Crown` your code starts in this process;
* ``CROWN_SYNC["START"] = True``: the app's own crown, started by the first request each process
  serves (or by :func:`start`), after any fork: under ``runserver`` the serving child only, under
  an ASGI server each serving worker. ``CROWN_SYNC["JOB"]`` (``f(term)``) is its leader child,
  run in a thread. It is stopped at interpreter exit.

In every case :func:`crown_sync.is_leader` is the answer, with no I/O. Settings, checked at
startup by Django's system checks (one error per bad key, naming it) are described in
:mod:`crown_sync.django.conf`. Signals: :mod:`crown_sync.django.signals`. Nothing of Django is
imported by ``import crown_sync``; only this package imports it.
"""

from .decorators import follower_response, leader_only
from .runtime import crown, is_leader, leader, leader_url, start, stop
from .signals import deposed, elected, new_leader

__all__ = ["leader_only", "follower_response", "start", "stop", "crown", "is_leader", "leader", "leader_url",
           "elected", "deposed", "new_leader"]
