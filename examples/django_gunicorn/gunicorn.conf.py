# One scheduler across every Gunicorn master that shares the oracle, for a Django project.
# The crown runs in the master; the scheduler runs in a process forked from the leading master.
import crown_sync.gunicorn
on_starting, when_ready, on_exit = crown_sync.gunicorn.crown_in_master(
    "django-demo", child="examples.django_gunicorn.jobs:run_scheduler")  # NAME as in settings.CROWN_SYNC

wsgi_app = "examples.django_gunicorn.wsgi:application"
workers = 4
