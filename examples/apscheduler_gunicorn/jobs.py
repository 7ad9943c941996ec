"""The scheduler: an APScheduler BackgroundScheduler in the leading master's job process.

``run_scheduler`` runs as a ProcessChild forked from the Gunicorn master that holds the crown: it
stops (SIGTERM) when the term ends and is SIGKILLed with its master. Ticks are on a fixed
wall-clock grid (every ``TICK`` seconds since 2000-01-01 UTC), so every host's scheduler agrees on
which tick is which: after a failover the new leader's first tick is simply the next one on the
grid, and no tick can run twice (only one scheduler exists at a time).

For the demo each tick appends a line to a journal (``EXAMPLE_JOURNAL``, see
crown_sync.testing.journal): ``start`` when the scheduler starts, one ``beat`` per tick naming
the tick's scheduled time, after the tick's work ran (not when it found itself no longer
leading), and ``stop`` when it shuts down. A real job would
pass ``term_info.token`` (the fencing token) to whatever it writes to.
"""

import datetime
import os
import signal
import tempfile
import threading

from apscheduler.events import EVENT_JOB_EXECUTED
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

import crown_sync
from crown_sync.testing.journal import Journal

TICK = float(os.environ.get("EXAMPLE_TICK", "0.5"))
GRID = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)


def tick(term_info) -> bool:
    """The scheduled work. Check leadership right before acting (no I/O: shared memory)."""
    if not crown_sync.is_leader(term_info.name):
        return False
    # ... do the work here, passing term_info.token to what you write to ...
    return True


def run_scheduler(term_info) -> None:
    path = os.environ.get("EXAMPLE_JOURNAL") or os.path.join(tempfile.gettempdir(), "apscheduler-demo.journal")
    journal = Journal(path)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())  # the crown's "term over"

    def journal_tick(event):
        if event.exception is None and event.retval:  # the work really ran
            journal.write("beat", term_info.name, term_info.identity, term_info.token,
                          tick=event.scheduled_run_time.timestamp())

    scheduler = BackgroundScheduler(timezone=datetime.timezone.utc)
    scheduler.add_listener(journal_tick, EVENT_JOB_EXECUTED)
    scheduler.add_job(tick, IntervalTrigger(seconds=TICK, start_date=GRID), args=(term_info,),
                      id="tick", misfire_grace_time=None, coalesce=False,
                      max_instances=5)  # a tick late by a stall must not cause the next one's skip
    journal.write("start", term_info.name, term_info.identity, term_info.token)
    scheduler.start()
    done.wait()
    scheduler.shutdown(wait=True)  # running ticks finish (the grace before SIGKILL is 5 s)
    journal.write("stop", term_info.name, term_info.identity, term_info.token)
    journal.close()
