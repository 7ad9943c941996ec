"""The scheduler: an APScheduler BackgroundScheduler in the leading master's job process.

``run_scheduler`` runs as a ProcessChild forked from the Gunicorn master that holds the crown: it
stops (SIGTERM) when the term ends and is SIGKILLed with its master. Ticks are on a fixed
wall-clock grid (every ``TICK`` seconds since 2000-01-01 UTC), so every host's scheduler agrees on
which tick is which.

Every tick runs exactly once across failovers: only one scheduler exists at a time (the crown),
and a new scheduler first catches up on the ticks that fell due while nobody led (up to
``CATCH_UP`` seconds back), reading what was done from the ledger the work writes to, then lets
APScheduler run the rest. Here the ledger is the demo's journal (``EXAMPLE_JOURNAL``, see
crown_sync.testing.journal): ``start`` when the scheduler starts, one ``beat`` per tick naming
the tick's scheduled time, written once the tick's work ran, and ``stop`` when it shuts down. A
real job records each tick where it writes its results, in the same transaction, with
``term_info.token`` (the fencing token) so that a stale scheduler's write is refused; a tick whose
work was done but whose record was not (the process died in between) would otherwise run again.
"""

import datetime
import math
import os
import signal
import tempfile
import threading
import time

from apscheduler.events import EVENT_JOB_EXECUTED
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

import crown_sync
from crown_sync.testing.journal import Journal, read

TICK = float(os.environ.get("EXAMPLE_TICK", "0.5"))
GRID = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
#: How far back a new scheduler runs ticks that nobody ran (s); older ones are left out.
CATCH_UP = float(os.environ.get("EXAMPLE_CATCH_UP", "60"))


def tick(term_info) -> bool:
    """The scheduled work. Check leadership right before acting (no I/O: shared memory)."""
    if not crown_sync.is_leader(term_info.name):
        return False
    # ... do the work here, passing term_info.token to what you write to ...
    return True


def last_tick_done(path: str):
    """The scheduled time (epoch s) of the latest tick in the ledger, or None."""
    if not os.path.exists(path):
        return None
    ticks = [event["tick"] for event in read(path) if event.get("ev") == "beat" and "tick" in event]
    return max(ticks) if ticks else None


def run_scheduler(term_info) -> None:
    path = os.environ.get("EXAMPLE_JOURNAL") or os.path.join(tempfile.gettempdir(), "apscheduler-demo.journal")
    done_before = last_tick_done(path)  # the previous term's scheduler has stopped: this is final
    journal = Journal(path)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())  # the crown's "term over"

    def journal_tick(event):
        if event.exception is None and event.retval:  # the work really ran
            journal.write("beat", term_info.name, term_info.identity, term_info.token,
                          tick=event.scheduled_run_time.timestamp())

    # The scheduler's first tick: the next one on the grid. Those before it are caught up below.
    elapsed = (datetime.datetime.now(datetime.timezone.utc) - GRID).total_seconds()
    first = GRID + datetime.timedelta(seconds=math.ceil(elapsed / TICK) * TICK)
    scheduler = BackgroundScheduler(timezone=datetime.timezone.utc)
    scheduler.add_listener(journal_tick, EVENT_JOB_EXECUTED)
    scheduler.add_job(tick, IntervalTrigger(seconds=TICK, start_date=GRID), args=(term_info,),
                      id="tick", next_run_time=first, misfire_grace_time=None, coalesce=False,
                      max_instances=5)  # a tick late by a stall must not cause the next one's skip
    journal.write("start", term_info.name, term_info.identity, term_info.token)
    scheduler.start()
    if done_before is not None:  # oldest first, the ticks that fell due while nobody led
        due = GRID + datetime.timedelta(seconds=round((done_before - GRID.timestamp()) / TICK + 1) * TICK)
        while due < first and not done.is_set():
            if due.timestamp() >= time.time() - CATCH_UP and tick(term_info):
                journal.write("beat", term_info.name, term_info.identity, term_info.token,
                              tick=due.timestamp(), late=True)
            due += datetime.timedelta(seconds=TICK)
    done.wait()
    scheduler.shutdown(wait=True)  # running ticks finish (the grace before SIGKILL is 5 s)
    journal.write("stop", term_info.name, term_info.identity, term_info.token)
    journal.close()
