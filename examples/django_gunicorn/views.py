"""Any worker of any master can tell whether this host runs the scheduler, with no I/O."""

import os

from django.http import JsonResponse
from django.views.decorators.http import require_POST

import crown_sync.django
from crown_sync.django import leader_only
from crown_sync.gunicorn import leader_token


def index(request):
    # From memory the master's crown keeps up to date (crown_sync.gunicorn): no I/O.
    return JsonResponse({"scheduler_here": crown_sync.django.is_leader(), "token": leader_token("django-demo"),
                         "worker": os.getpid()})


@require_POST
@leader_only  # other hosts answer 503 + Retry-After
def run_now(request):
    return JsonResponse({"accepted": True, "token": leader_token("django-demo")})
