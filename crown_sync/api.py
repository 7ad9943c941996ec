"""Process-wide functions of the public API: lead(), is_leader(name), status(name), ..."""

import contextlib
from typing import Dict, Iterator, List, Optional

from . import registry
from .crown import Crown, Status, check_name
from .oracle import Leader, Oracle
from .oracles._base import Election, ListingUnsupported
from .urls import default_oracle, oracle_from_url

__all__ = ["lead", "is_leader", "status", "find_leader", "dismiss", "known_leaders", "list_elections", "Election",
           "ListingUnsupported"]


@contextlib.contextmanager
def lead(name: str, oracle=None, child=None, **options) -> Iterator[Crown]:
    """A started Crown for the ``with`` block; stopped (child, abdicate, close) on exit."""
    crown = Crown(name, oracle=oracle, child=child, **options).start()
    try:
        yield crown
    finally:
        crown.stop()


def is_leader(name: str) -> bool:
    """True iff a started crown of that name in this process leads. No I/O.

    Also True when a leadership provider (:func:`crown_sync.registry.add_provider`) says this host
    leads: e.g. in a Gunicorn worker whose master runs the crown (:mod:`crown_sync.gunicorn`).
    """
    if any(crown.is_leader() for crown in registry.crowns(name)):
        return True
    return registry.provided_leader(name)


def status(name: str) -> Status:
    """Status of the started crown of that name (the leading one if several); KeyError if none."""
    crowns = registry.crowns(name)
    if not crowns:
        raise KeyError(name)
    for crown in crowns:
        if crown.is_leader():
            return crown.status()
    return crowns[-1].status()


def known_leaders() -> Dict[str, Leader]:
    """{name: Leader} for every crown started in this process whose leader it knows."""
    leaders = {}
    for crown in registry.crowns():
        leader = crown.leader()
        if leader is not None and (crown.name not in leaders or crown.is_leader()):
            leaders[crown.name] = leader
    return leaders


@contextlib.contextmanager
def _oracle_for(oracle) -> Iterator[Oracle]:
    if isinstance(oracle, Oracle):
        yield oracle
        return
    if oracle is None:
        instance = default_oracle()
    elif isinstance(oracle, str):
        instance = oracle_from_url(oracle)
    else:
        raise TypeError(f"oracle must be an Oracle, an oracle URL or None, got {type(oracle).__name__}")
    try:
        yield instance
    finally:
        instance.close()


def find_leader(name: str, oracle=None) -> Optional[Leader]:
    """The leader of ``name`` read from the oracle, without contending; None if there is none."""
    check_name(name)
    with _oracle_for(oracle) as instance:
        return instance.find_leader(name)


def dismiss(name: str, oracle=None) -> bool:
    """Make the current leader of ``name`` step down (it may contend again). True if there was one."""
    check_name(name)
    with _oracle_for(oracle) as instance:
        return instance.dismiss(name)


def list_elections(oracle=None) -> List[Election]:
    """Every election on the oracle (an Oracle, a URL, or None for the default), sorted by name,
    with its leader and, where the oracle can tell, how many contenders it has: the fleet view
    (evel's ``known_leaders``, for a whole oracle rather than one process). Raises
    :class:`ListingUnsupported` when the oracle cannot list (see ``OracleBase.elections``)."""
    with _oracle_for(oracle) as instance:
        listing = getattr(instance, "elections", None)
        if listing is None:  # an Oracle written outside this library, without the fleet view
            raise ListingUnsupported(f"{type(instance).__name__} cannot list its elections (no elections())")
        return sorted(listing(), key=lambda election: election.name)
