"""Settings of the example project: the crown_sync app and its one required setting."""

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-a-secret")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = ["crown_sync.django"]
MIDDLEWARE = []
ROOT_URLCONF = "examples.django_gunicorn.urls"
WSGI_APPLICATION = "examples.django_gunicorn.wsgi.application"
DATABASES = {}
USE_TZ = True

# ORACLE left out: $CROWN_SYNC_ORACLE, else the per-user file oracle (one host). On real hosts:
# "ORACLE": "postgresql://app@db/app" (the same on every host, and in gunicorn.conf.py).
CROWN_SYNC = {"NAME": "django-demo"}
