"""Hostile neighbours (issue #17): what a co-tenant of a shared server, or an awkward password,
can do to a crown. The file oracle's and memcached's own attacks are in their test modules."""

import logging
import urllib.parse

import pytest

import crown_sync
from crown_sync import telemetry
from crown_sync.testing.fleet import wait_until
from crown_sync.testing.servers import free_port

# '@', ':', '/', '#', unicode: every character a URL password must have %-encoded.
AWKWARD = "Aw@k:wä/rd#Pw☃"
ENCODED = urllib.parse.quote(AWKWARD, safe="")
URL_FORMS = [
    "postgresql://app:{pw}@127.0.0.1:{port}/db?connect_timeout=1",
    "postgresql://127.0.0.1:{port}/db?user=app&password={pw}&connect_timeout=1",
    "zookeeper://app:{pw}@127.0.0.1:{port}/x?session_timeout=4&connect_timeout=1",
    "redis://app:{pw}@127.0.0.1:{port}/0?connect_timeout=1",
    "redis://:{pw}@127.0.0.1:{port}/0?connect_timeout=1",
    "nats://app:{pw}@127.0.0.1:{port}?connect_timeout=1",
    "nats://{pw}@127.0.0.1:{port}?connect_timeout=1",
]


def _never_shown(text):
    return AWKWARD not in text and ENCODED not in text and "Pw☃" not in text and "Pw%E2" not in text


@pytest.mark.parametrize("form", URL_FORMS, ids=lambda form: form.split("@")[0].split("?")[0])
def test_an_awkward_password_shows_in_no_status_event_or_log_of_a_failing_oracle(form, caplog):
    caplog.set_level(logging.DEBUG, logger="crown_sync")
    url = form.format(pw=ENCODED, port=free_port())  # nothing listens there
    events = []
    handle = telemetry.attach(lambda event, meta: events.append(repr((event, meta))))
    crown = crown_sync.Crown("awkward", oracle=url, monitor_delay=0.2)
    try:
        crown.start()
        wait_until(lambda: crown.status().last_error, message="last_error", timeout=60)
        status = crown.status()
        assert "127.0.0.1" in status.oracle, status.oracle  # the server is named (the password is not)
        assert _never_shown(repr(status)) and _never_shown(crown.oracle.description), repr(status)
    finally:
        crown.stop()
        telemetry.detach(handle)
    assert events and all(_never_shown(event) for event in events)
    assert all(_never_shown(record.getMessage()) for record in caplog.records)
