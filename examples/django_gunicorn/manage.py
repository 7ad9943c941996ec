#!/usr/bin/env python
"""``python examples/django_gunicorn/manage.py crown_sync status`` from the repository root."""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_gunicorn.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
