"""Celery beat on every host, sending only while its crown leads (crown_sync.celery).

On every host, from the repository root (so that ``examples`` imports)::

    celery -A examples.celery_beat.app beat      # LeaderScheduler is this app's beat_scheduler
    celery -A examples.celery_beat.app worker

Environment: ``CELERY_BROKER_URL`` (a Redis broker, default ``redis://127.0.0.1:6379/0``),
``CROWN_SYNC_ORACLE`` (the oracle; unset: the local file lock, one host only), ``EXAMPLE_EVERY``
(seconds between reports, default 10) and ``EXAMPLE_LEDGER`` (the file the task writes to).

The task fences with its term's token: a Redis key keeps the highest token seen, and a message
sent in an older term (by a beat that lost its crown just after sending, delivered late) is
refused, whatever order the queue hands messages out in.
"""

import json
import logging
import os
import tempfile

import redis
from celery import Celery

BROKER = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
LEDGER = os.environ.get("EXAMPLE_LEDGER", os.path.join(tempfile.gettempdir(), "celery-beat-demo.ledger"))
FENCE_KEY = "example-celery-beat:fence"
# Set the key to the token unless it already holds a higher one; 1 if the token is accepted.
FENCE = """
local seen = tonumber(redis.call('GET', KEYS[1]) or '-1')
if tonumber(ARGV[1]) < seen then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""

logger = logging.getLogger(__name__)

app = Celery("celery_beat_example", broker=BROKER)
app.conf.update(
    beat_schedule={"report": {"task": "examples.celery_beat.app.report",
                              "schedule": float(os.environ.get("EXAMPLE_EVERY", "10"))}},
    beat_scheduler="crown_sync.celery:LeaderScheduler",
    crown_sync_name="example-celery-beat",  # no crown_sync_oracle: $CROWN_SYNC_ORACLE is read
    crown_sync_options={"monitor_delay": 1.0},
    broker_connection_retry_on_startup=True,
)


@app.task(bind=True)
def report(self):
    """The scheduled work: accepted only with a token no lower than any seen before."""
    token = self.request.get("crown_sync_token")
    client = redis.Redis.from_url(BROKER)
    try:
        accepted = token is not None and bool(client.eval(FENCE, 1, FENCE_KEY, int(token)))
    finally:
        client.close()
    if not accepted:
        logger.warning("report %s from an older term (token %s): refused", self.request.id, token)
    # ... the real work goes here, writing with the token where it lands ...
    with open(LEDGER, "a") as ledger:
        ledger.write(json.dumps({"id": self.request.id, "token": token, "accepted": accepted}) + "\n")
    return accepted
