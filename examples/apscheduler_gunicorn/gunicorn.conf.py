# One APScheduler scheduler across every Gunicorn master that shares the oracle.
# The crown runs in the master; the scheduler runs in a process forked from the leading master.
import crown_sync.gunicorn
on_starting, when_ready, on_exit = crown_sync.gunicorn.crown_in_master(
    "apscheduler-demo", child="examples.apscheduler_gunicorn.jobs:run_scheduler")

workers = 4
