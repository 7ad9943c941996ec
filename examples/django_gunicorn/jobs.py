"""The scheduler, in a process forked from the Gunicorn master that holds the crown.

The master has not loaded Django (unless ``preload_app``), so the job sets Django up first: then
it can use the project's models and settings. The scheduler itself is the APScheduler example's
(``examples/apscheduler_gunicorn/jobs.py``): ticks on a fixed wall-clock grid, the ticks missed
during a failover caught up from the ledger, each tick once. A real job records each tick where
it writes its results (a model, in the same transaction), with ``term_info.token``.
"""

import os


def run_scheduler(term_info) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_gunicorn.settings")
    import django

    django.setup()

    from examples.apscheduler_gunicorn.jobs import run_scheduler as scheduler

    scheduler(term_info)
