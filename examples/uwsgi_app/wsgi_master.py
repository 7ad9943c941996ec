"""The WSGI app for uwsgi-master.ini: the crown runs in the master (crown_master.py)."""

import json
import os

import crown_sync
from crown_sync.gunicorn import leader_token

from examples.uwsgi_app.crown_master import NAME


def application(environ, start_response):
    # No I/O: the answer comes from memory the master's crown keeps up to date.
    body = {"job_here": crown_sync.is_leader(NAME), "token": leader_token(NAME), "worker": os.getpid()}
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(body).encode()]
