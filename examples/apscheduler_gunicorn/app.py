"""The web app: any worker of any master can tell whether this host runs the scheduler."""

import os

from flask import Flask

import crown_sync
from crown_sync.flask import CrownSync, leader_only
from crown_sync.gunicorn import leader_token

app = Flask(__name__)
app.config.update(CROWN_SYNC_NAME="apscheduler-demo", CROWN_SYNC_STATUS_URL="/_crown_sync")
CrownSync(app)


@app.get("/")
def index():
    # No I/O: the answer comes from memory the master's crown keeps up to date.
    return {"scheduler_here": crown_sync.is_leader("apscheduler-demo"),
            "token": leader_token("apscheduler-demo"), "worker": os.getpid()}


@app.post("/run-now")
@leader_only  # other hosts answer 503 + Retry-After
def run_now():
    return {"accepted": True, "token": leader_token("apscheduler-demo")}
