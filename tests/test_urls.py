"""crown_sync.urls: what a missing oracle library says."""

import importlib
import urllib.parse

import pytest

from crown_sync.urls import missing_library, redact, redact_text


def test_a_missing_module_is_named_and_the_extra_to_install_given():
    with pytest.raises(ImportError) as caught:
        importlib.import_module("crown_sync_no_such_client")
    error = missing_library("the zookeeper:// oracle", caught.value, "zookeeper")
    assert str(error) == (
        "the zookeeper:// oracle needs a library that is not installed: crown_sync_no_such_client; "
        "pip install 'crown_sync[zookeeper]'"
    )


def test_a_library_that_cannot_load_says_why_not_none():
    # psycopg installed without libpq raises an ImportError whose name is None
    cause = ImportError("no pq wrapper available: libpq library not found")
    assert cause.name is None
    error = missing_library("PostgresOracle", cause, "postgres")
    assert "None" not in str(error)
    assert str(error) == (
        "PostgresOracle needs a library that cannot be loaded: no pq wrapper available: libpq "
        "library not found; pip install 'crown_sync[postgres]'"
    )


# Passwords in every URL form the oracles accept: '@', ':', '/', '?', '#', %-encoded, unicode.
PASSWORDS = ["s3cr@t", "p:a:ss", "a@b:c@d", "ends@", "p%40ss%3Aw%2F", "pässwört☃", "sl/ash?q#f"]
# (URL with {pw} in it, the same URL as redact() must give it)
USERINFO_FORMS = [
    ("postgresql://alice:{pw}@db.example:5432/app?connect_timeout=3",
     "postgresql://alice:***@db.example:5432/app?connect_timeout=3"),
    ("postgres://alice:{pw}@db.example/app", "postgres://alice:***@db.example/app"),
    ("zookeeper://alice:{pw}@zk1.example:2181,zk2.example:2181/chroot?session_timeout=10",
     "zookeeper://alice:***@zk1.example:2181,zk2.example:2181/chroot?session_timeout=10"),
    ("redis://alice:{pw}@r.example:6379/0?ttl=5", "redis://alice:***@r.example:6379/0?ttl=5"),
    ("redis://:{pw}@r.example:6379/0", "redis://:***@r.example:6379/0"),
    ("rediss://alice:{pw}@r.example:6380/0?ssl_ca_certs=/etc/ca.pem",
     "rediss://alice:***@r.example:6380/0?ssl_ca_certs=/etc/ca.pem"),
    ("nats://alice:{pw}@n.example:4222?bucket=crowns", "nats://alice:***@n.example:4222?bucket=crowns"),
    ("tls://alice:{pw}@n.example:4222?tls_ca=/etc/ca.pem", "tls://alice:***@n.example:4222?tls_ca=/etc/ca.pem"),
    ("memcached://alice:{pw}@m.example:11211", "memcached://alice:***@m.example:11211"),
]
# Forms where the secret must be %-encoded (a raw '&' or '#' splits a parameter, a raw ':' makes a
# token a user:password).
ENCODED_FORMS = [
    ("nats://{enc}@n.example:4222", "nats://***@n.example:4222"),  # a token
    ("postgresql://db.example/app?user=alice&password={enc}&sslmode=require",
     "postgresql://db.example/app?user=alice&password=***&sslmode=require"),
    ("postgresql://db.example/app?sslpassword={enc}", "postgresql://db.example/app?sslpassword=***"),
]
# libpq key=value DSNs: unquoted (no spaces in the value) and quoted.
DSN_FORMS = [
    ("host=db.example user=alice password={pw} dbname=app", "host=db.example user=alice password=*** dbname=app"),
    ("host=db.example password='{pw} with space' dbname=app", "host=db.example password=*** dbname=app"),
]


def _pieces(password):
    """What must never show: the password as written and percent-decoded (no piece of 3+)."""
    texts = {password, urllib.parse.unquote(password)}
    return {t[i:i + 3] for t in texts for i in range(len(t) - 2)}


def _cases(forms, encode):
    for template, expected in forms:
        for password in PASSWORDS:
            value = urllib.parse.quote(password, safe="") if encode else password
            yield pytest.param(template.format(pw=value, enc=value), expected, password, id=f"{template[:12]}-{password}")


ALL_CASES = list(_cases(USERINFO_FORMS, False)) + list(_cases(ENCODED_FORMS, True)) + list(_cases(DSN_FORMS, False))


@pytest.mark.parametrize("url, expected, password", ALL_CASES)
def test_redact_masks_the_whole_password_and_keeps_the_rest(url, expected, password):
    assert redact(url) == expected


@pytest.mark.parametrize("url, expected, password", ALL_CASES)
def test_redact_text_masks_a_url_quoted_in_a_message(url, expected, password):
    for message in (f"cannot connect to {url!r}: refused", f"oracle {url} failed (timeout)", url):
        shown = redact_text(message)
        leaked = [piece for piece in _pieces(password) if piece in shown and piece not in expected]
        assert not leaked, (shown, leaked)
        host = expected.split("@")[-1].split("/")[0].split(":")[0].split("=")[-1]
        assert host.split()[0] in shown  # the server is still named


def test_redact_text_keeps_urls_and_options_without_secrets():
    text = "memcached://127.0.0.1:11211?ttl=5 and zookeeper://h1:2181,h2:2181/x: user=alice port=5432"
    assert redact_text(text) == text
