"""PostgreSQL candidacies (see :doc:`ranking`): a session of its own per candidate, holding a
shared advisory lock on the election's candidates key (``advisory_key(namespace, "candidates:"
+ name)``: ``:`` is never in an election name, so it is no election's key), every statement of it
ending in a comment that carries the candidate as JSON. ``pg_locks`` joined with
``pg_stat_activity`` then lists the live candidates in one statement: a session ends with its
process (the kernel closes the socket) or its host (the keepalives the oracle sets), and its lock
with it.

Why a session of its own rather than the lock session's ``application_name``: the lock session
may be shared by many crowns or replaced (and ``application_name`` holds 63 bytes, not an
identity); the candidacy costs one idle connection per ranked contender, none for ``"first"``.
Reading others' statements needs what reading leader records needs: the crowns' role (or
``pg_read_all_stats``) and ``track_activities`` on.
"""

import json
import re
from typing import Any, List, Optional

import psycopg

from ...oracle import Candidate
from .._base import bounded
from .._candidacy import CandidacyBase
from ._common import _key_parts, advisory_key
from ._sql import _KEY_LOCK

__all__ = ["PostgresCandidacy"]

_MARK = "crown_sync-candidate "
_COMMENT = re.compile(r"/\*" + re.escape(_MARK) + r"(\{.*\})\*/\s*$", re.S)
_READ = "SELECT a.query FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE " + _KEY_LOCK + " AND l.granted"


class PostgresCandidacy(CandidacyBase):
    def __init__(self, oracle: Any, name: str, candidate: Candidate):
        super().__init__()
        self._oracle = oracle
        key = advisory_key(oracle.namespace, "candidates:" + name)
        hi, lo = _key_parts(key)
        self._params = {"key": key, "hi": hi, "lo": lo}
        # JSON may say "*/" only as "*\/": the comment must end where ours does
        self._comment = " /*" + _MARK + json.dumps(candidate.to_dict()).replace("*/", "*\\/") + "*/"
        self._conn: Optional[psycopg.Connection] = None

    def candidates(self) -> List[Candidate]:
        with self._open():
            try:
                rows = self._session().execute(_READ + self._comment, self._params).fetchall()
            except psycopg.Error as exc:
                self._drop()  # its lock, if the session lived, goes with it; the next call stands anew
                raise ConnectionError(f"reading the candidates: {self._oracle.safe_error(exc)}") from None
        return [c for c in (_parse(query) for (query,) in rows) if c is not None]

    def _session(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            conn = self._oracle.connect("crown_sync candidate")
            try:
                # the session stays idle: a server-wide idle_session_timeout must not end it
                conn.execute("SET idle_session_timeout = 0" + self._comment)
                locked = conn.execute("SELECT pg_try_advisory_lock_shared(%(key)s)" + self._comment,
                                      self._params).fetchone()[0]
                if not locked:
                    raise ConnectionError("the candidates key is locked exclusively by a foreign session")
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # already broken: nothing more to release
                pass

    def close(self) -> None:
        self._closed = True
        # a read stuck on a frozen server holds the lock: its session ends when that read fails
        bounded(self._lock, 1.0, self._drop, lambda: None)


def _parse(query: Optional[str]) -> Optional[Candidate]:
    match = _COMMENT.search(query or "")
    if match is None:
        return None
    try:
        return Candidate.from_dict(json.loads(match.group(1)))
    except ValueError:
        return None
