"""The oracle interface: what the crown engine asks of ZooKeeper, Postgres, memcached or a file.

Modelled on Elixir Crown's five callbacks (init, claim, refresh, abdicate, handle_info), plus what
fast watching and fencing need. An :class:`Oracle` is a connection-level object that may be shared
by many crowns; for every crown it hands out one :class:`Contender`, which owns whatever must not
be shared between contenders (a Postgres session, a lock file descriptor, an ephemeral node).

The engine drives a contender from one thread (its loop thread). The only calls that come from
other threads are :meth:`Contender.close` (from ``stop()``) and the contender's own calls to the
``on_change`` callback it was given. Contenders call ``on_change`` from any thread, never while
holding a lock the engine could be waiting on, to say "something changed, look now":

* ``on_change()``: the leader we watch may be gone, or a refresh is due early (e.g. a dismissal);
* ``on_change(lost=True)``: our leadership is certainly or probably gone (ZooKeeper SUSPENDED, a
  Postgres connection broke). The engine ends the term at once, without waiting for I/O.

Deadlines are :func:`crown_sync.clock.monotonic` values (CLOCK_BOOTTIME: a host suspend counts,
as it does for the server's lease). An oracle computes a term's deadline from the START of
the call that confirmed the lease (never the end: the server's clock started before our reply
came back), minus a margin for the child to stop. ``None`` means the oracle revokes the lease only
when we release it or our process dies (a kernel file lock), so no local expiry is needed.

Fencing tokens come from the oracle and must be strictly greater than every earlier term's token
of the same election on the same oracle.

This module imports nothing from the engine, and the engine imports no oracle module.
"""

import abc
import dataclasses
from typing import Any, Callable, Dict, List, Optional, Tuple

__all__ = ["Leader", "Claim", "Oracle", "Contender", "OnChange", "Candidate", "Candidacy"]

OnChange = Callable[..., None]


@dataclasses.dataclass(frozen=True)
class Leader:
    """A leader as published on the oracle.

    ``since`` is wall-clock epoch seconds (for people to read, never for safety decisions).
    """

    identity: str
    metadata: Dict[str, Any] = dataclasses.field(default_factory=dict)
    token: Optional[int] = None
    since: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Leader":
        return cls(
            identity=str(data.get("identity", "")),
            metadata=dict(data.get("metadata") or {}),
            token=data.get("token"),
            since=data.get("since"),
        )


@dataclasses.dataclass(frozen=True)
class Claim:
    """The answer to :meth:`Contender.claim` and :meth:`Contender.refresh`.

    won: True if we hold the leadership now.
    leader: the leader as the oracle sees it (ourselves when won; None if unknown or none).
    token: the term's fencing token when won.
    deadline: monotonic time by which the term must have ended unless refreshed again; None if
        the oracle needs no local expiry (see module docstring).
    refresh_in: seconds until the engine should call refresh(); None: only when on_change() asks.
    fds: file descriptors that child processes of the term must inherit, so that the oracle keeps
        the election closed until every one of them has exited (the file oracle's lock).
    yield_for: with ``won=False`` from refresh(): seconds to stay out of the contest before
        claiming again, so that another contender takes over (a dismissed leader yields).
    reason: with ``won=False`` from refresh(): why the term ends, when it is given up on purpose
        (``"preempted"``); None: the lease was lost or refused (reason ``"refresh"``).
    """

    won: bool
    leader: Optional[Leader] = None
    token: Optional[int] = None
    deadline: Optional[float] = None
    refresh_in: Optional[float] = None
    fds: Tuple[int, ...] = ()
    yield_for: float = 0.0
    reason: Optional[str] = None


class Contender(abc.ABC):
    """One crown's seat at one election. Created by :meth:`Oracle.contender`.

    Methods other than close() are called from the crown's loop thread only, one at a time.
    Any of them may raise on oracle errors; the engine retries with backoff. They must not block
    for much longer than the oracle's own timeouts.
    """

    @abc.abstractmethod
    def claim(self) -> Claim:
        """Try to become leader now, without waiting for the current leader to go.

        On success, publish the leader record (identity, metadata, token, since), or, if that
        would cost a round trip the oracle can defer, return ``refresh_in=0`` and publish it in
        the first refresh (the engine starts the child first).
        On failure, return ``Claim(won=False, leader=<current leader or None>)``.
        """

    @abc.abstractmethod
    def refresh(self) -> Claim:
        """Leader only: confirm (and renew) the leadership won by the last claim.

        Return ``won=False`` when leadership is known to be lost (then the engine ends the term).
        Raise when the answer is unknown (the engine retries until the deadline).
        """

    @abc.abstractmethod
    def watch(self, leader: Optional[Leader]) -> bool:
        """Follower only: arrange for ``on_change()`` when ``leader`` may have gone.

        Return False if the leader is already gone (the engine claims at once). Must not block
        until the leader goes: waiting happens in the engine, or in the oracle's own threads.
        A second watch() replaces the first.
        """

    @abc.abstractmethod
    def abdicate(self) -> None:
        """Give up leadership if it is still ours, so a successor can claim at once.

        Called after the term's child has stopped. Idempotent; never releases someone else's.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Release everything (leadership included). Idempotent, callable from any thread,
        bounded in time even when the server is unreachable."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A contender as it stands for election (see :doc:`ranking`): ``priority`` (larger is
    preferred), ``joined`` (wall-clock epoch seconds when it joined: for people and ``"oldest"``)
    and ``key``, random per candidacy, which tells apart two contenders of one identity."""

    identity: str
    priority: int = 0
    joined: float = 0.0
    key: str = ""

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Optional["Candidate"]:
        """The candidate ``data`` describes, or None if it is not one (a foreign or torn record)."""
        try:
            priority, joined = data["priority"], float(data["joined"])
            if isinstance(priority, bool) or not isinstance(priority, int):
                return None
            return cls(str(data["identity"]), priority, joined, str(data["key"]))
        except (KeyError, TypeError, ValueError):
            return None


class Candidacy(abc.ABC):
    """A contender's published candidacy: an optional capability of an oracle, which offers it as
    ``oracle.candidacy(name, candidate) -> Candidacy`` (no I/O there). Called from the crown's
    loop thread, except close()."""

    @abc.abstractmethod
    def candidates(self) -> List[Candidate]:
        """Publish ours if it is not (yet, or any more) published, and return every live candidate
        of the election, ours included. Raises on oracle errors."""

    @abc.abstractmethod
    def close(self) -> None:
        """Withdraw the candidacy. Idempotent, callable from any thread, bounded in time."""


class Oracle(abc.ABC):
    """A connection to a coordination service, shared by any number of crowns."""

    #: Human-readable location of the oracle, safe to log: it never contains a password.
    description: str = ""

    @abc.abstractmethod
    def contender(
        self,
        name: str,
        identity: str,
        metadata: Dict[str, Any],
        on_change: OnChange,
    ) -> Contender:
        """A new contender for election ``name``. Must not do blocking I/O: connect lazily."""

    def check_contender(self, name: str, identity: str, metadata: Dict[str, Any]) -> None:
        """Raise ValueError/TypeError, naming the argument, for what :meth:`contender` would
        refuse (a name or a leader record the server cannot store). No I/O: crowns call it at
        construction, so bad input fails there rather than in their loop. Default: accept."""

    @abc.abstractmethod
    def find_leader(self, name: str) -> Optional[Leader]:
        """The current leader of ``name``, read without contending; None if there is none."""

    @abc.abstractmethod
    def dismiss(self, name: str) -> bool:
        """Make the current leader of ``name`` step down. True if there was a leader to dismiss.

        The dismissed leader notices (through its refresh or on_change) and ends its term; it may
        contend again.
        """

    def close(self) -> None:
        """Release shared resources (connections, clients). Idempotent."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}>"
