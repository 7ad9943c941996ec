"""crown_sync.urls: what a missing oracle library says."""

import importlib

import pytest

from crown_sync.urls import missing_library


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
