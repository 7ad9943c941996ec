"""A plain WSGI app under uWSGI whose job runs once across the fleet (see uwsgi.ini).

One crown per worker: each uWSGI worker starts its own crown after uWSGI forks it, and the one
leading worker runs ``jobs.run_job`` in a thread, with the app loaded. A request can ask whether
the worker that serves it leads.
"""

import json
import os

import crown_sync
import crown_sync.uwsgi

NAME = "uwsgi-demo"

# With lazy-apps off this module is imported in the master: the crown starts in each worker after
# the fork (a postfork hook). With lazy-apps on it is imported in each worker: it starts at once.
crown_sync.uwsgi.crown_per_worker(NAME, child="examples.uwsgi_app.jobs:run_job")


def application(environ, start_response):
    body = {"job_here": crown_sync.is_leader(NAME), "worker": os.getpid()}  # no I/O
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(body).encode()]
