"""Settings of the test project. The election name comes from ``CROWN_TEST_NAME``, the oracle
from ``CROWN_SYNC_ORACLE`` (ORACLE None); ``CROWN_TEST_START=1`` runs the app's own crown with
the journaling job (``CROWN_TEST_JOURNAL``)."""

import os

SECRET_KEY = "crown-sync-tests-only"
DEBUG = False
ALLOWED_HOSTS = ["testserver", "127.0.0.1", "localhost"]
INSTALLED_APPS = ["crown_sync.django"]
MIDDLEWARE = []
ROOT_URLCONF = "tests.django_project.urls"
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
USE_TZ = True
LOGGING_CONFIG = None

_START = os.environ.get("CROWN_TEST_START") == "1"
CROWN_SYNC = {
    "NAME": os.environ.get("CROWN_TEST_NAME", "django-test"),
    "START": _START,
    "JOB": "tests.django_project.jobs:journal_job" if _START else None,
    "OPTIONS": {"monitor_delay": 0.2},
}
