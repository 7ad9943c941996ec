"""Fixtures of the oracle tests: ``served``, parametrized over every oracle kind (tests/oracles/support.py).

A test that takes ``served`` runs once per kind in ``support.KINDS``, each kind's server started
once per session. ``@pytest.mark.needs("freeze", ...)`` limits it to the kinds that have all of
those capabilities. Kinds that start a server carry the ``server_oracle`` mark.
"""

import pytest

from .postgres_support import shared_kind
from .support import KINDS, Served

ALL_KINDS = KINDS + [shared_kind()]  # PostgreSQL again, in sessions=shared mode


def pytest_configure(config):
    config.addinivalue_line("markers", "needs(*capabilities): run only on the oracle kinds that have them")
    config.addinivalue_line("markers", "server_oracle: a contract case on an oracle that runs a server")


def pytest_generate_tests(metafunc):
    if "served" not in metafunc.fixturenames:
        return
    needs = [need for marker in metafunc.definition.iter_markers("needs") for need in marker.args]
    kinds = [kind for kind in ALL_KINDS if all(kind.has(need) for need in needs)]
    params = [pytest.param(kind, id=kind.name, marks=_marks(kind, metafunc.function.__name__)) for kind in kinds]
    # Session scope: one server per kind for the whole run, however many tests use it.
    metafunc.parametrize("served", params, indirect=True, scope="session")


def _marks(kind, test: str) -> list:
    marks = [pytest.mark.server_oracle] if kind.server else []
    if test in kind.known_bugs:
        marks.append(pytest.mark.xfail(strict=True, reason=f"known bug of {kind.name}: {kind.known_bugs[test]}"))
    return marks


@pytest.fixture(scope="session")
def served(request):
    kind = request.param
    server = kind.start()
    try:
        yield Served(kind, server)
    finally:
        kind.stop(server)
