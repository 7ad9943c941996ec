"""System checks of ``settings.CROWN_SYNC`` (run by ``manage.py check``, ``runserver``,
``migrate`` ...): one error per bad key, naming it."""

from django.conf import settings
from django.core import checks

from .conf import problems

__all__ = ["check_settings"]

#: Check ids by key: E001 the setting itself, E002 a key that is not a setting, E003+ a bad value.
IDS = {"CROWN_SYNC": "crown_sync.E001", "UNKNOWN": "crown_sync.E002", "NAME": "crown_sync.E003",
       "ORACLE": "crown_sync.E004", "START": "crown_sync.E005", "JOB": "crown_sync.E006",
       "METADATA": "crown_sync.E007", "OPTIONS": "crown_sync.E008", "FOLLOWER": "crown_sync.E009",
       "RETRY_AFTER": "crown_sync.E010", "LEADER_URL_KEY": "crown_sync.E011",
       "LEADER_CACHE": "crown_sync.E012"}


def check_settings(app_configs=None, **kwargs):
    _, found = problems(getattr(settings, "CROWN_SYNC", None))
    return [checks.Error(message, id=IDS.get(key, IDS["UNKNOWN"]), obj="settings.CROWN_SYNC")
            for key, message in found]
