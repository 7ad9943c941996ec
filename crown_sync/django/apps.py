"""The app config: registers the checks and the own crown's first-request start. Starts nothing."""

from django.apps import AppConfig


class CrownSyncConfig(AppConfig):
    name = "crown_sync.django"
    label = "crown_sync"
    verbose_name = "crown_sync"

    def ready(self) -> None:
        # ready() runs in every process that sets Django up (migrate, shell, the autoreloader's
        # watcher): nothing contends here. The own crown starts on a served request.
        from django.core import checks
        from django.core.signals import request_started

        from . import runtime
        from .checks import check_settings

        checks.register(check_settings)
        request_started.connect(runtime.start_on_request, dispatch_uid="crown_sync.django.start_on_request")
