"""The job: runs in the leading process while its term lasts.

``run_job(term)`` is a thread child (one crown per worker): it must return soon after
``term.stop_event`` is set. ``run_job_process(term_info)`` is the same job as a process child (the
crown in the master): it runs until SIGTERM, which it gets when the term ends. Both pass the fencing
token to what they write; here they append to the journal named by ``EXAMPLE_JOURNAL`` (see
crown_sync.testing.journal), if set.
"""

import os

from crown_sync.testing import journal

EVERY = 0.5  # seconds between two runs of the work


def do_work(token) -> None:
    """The work itself. Pass ``token`` to what you write to, and let it refuse stale tokens."""


def run_job(term) -> None:
    path = os.environ.get("EXAMPLE_JOURNAL")
    if path:
        journal.journaled_work(term, path, EVERY)  # the demo's own record of who worked when
        return
    while not term.stop_event.wait(EVERY):
        do_work(term.token)


def run_job_process(term_info) -> None:
    path = os.environ.get("EXAMPLE_JOURNAL")
    if path:
        journal.journaled_process(term_info, path, EVERY)
        return
    import signal
    import threading

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.wait(EVERY):
        do_work(term_info.token)
