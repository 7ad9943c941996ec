"""The own crown's job in the test project: journals its term (a thread child)."""

import os

from crown_sync.testing import journal

BEAT = 0.02


def journal_job(term) -> None:
    journal.journaled_work(term, os.environ["CROWN_TEST_JOURNAL"], BEAT)
