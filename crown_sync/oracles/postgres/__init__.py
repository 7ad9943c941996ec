"""PostgreSQL oracle: session advisory locks, a server-enforced lease, instant takeover.

``PostgresOracle("postgresql://app@db/app")`` or the URL ``postgresql://app@db/app?lease=10``.

How it works
------------
Every contender owns ONE dedicated autocommit connection (never a pool: advisory locks are
re-entrant per session, so two contenders sharing a session would both "win"). With
``sessions=shared`` the contenders of one oracle object share one holder session instead, one
local contender per key at a time (see _shared). The election
``name`` maps to a 64-bit advisory lock key (:func:`advisory_key`); the leader is whoever's
session holds ``pg_advisory_lock(key)``.

* **claim** runs ``pg_try_advisory_lock(key)``. On success, in the same statement and only after
  the lock is granted, it takes the fencing token ``pg_current_xact_id()`` and writes a
  transactional ``pg_logical_emit_message`` so that the commit is WAL-flushed (see *tokens*).
* **followers** wait in a thread on their own connection in a blocking ``pg_advisory_lock(key)``
  (the same statement then takes the token), so the server wakes the first waiter the instant the
  holder's session ends or unlocks: no polling. Each wait is bounded by ``lock_timeout =
  wait_timeout`` because a running statement pins its snapshot's xmin, which would hold back
  VACUUM for as long as a follower waits; after a timeout the waiter reads the current leader
  record (so ``crown.leader()`` stays fresh) and waits again: two cheap statements per
  ``wait_timeout`` at rest. While its waiter is queued, ``claim()`` answers "lost" with no I/O:
  the server would have woken the waiter if the lock were free. Only the first follower in the
  election's *line* waits for the lock and LISTENs; the others queue for the line, deaf (see
  _line: PostgreSQL signals every listening backend at every NOTIFY).
* **refresh** (every ``confirm_interval``) confirms, in one statement, that the backend pid and a
  per-session marker are unchanged and that ``pg_locks`` shows our pid holding the key.
* **abdicate** sends, in one round trip, ``BEGIN; NOTIFY <channel>, 'released:<token>'; COMMIT;
  SELECT pg_advisory_unlock_all()`` (the session is ours alone, so this releases exactly our
  lock, however many times it was re-entered). Every claim sends ``'claimed:<token>'`` in its own
  transaction. A contender LISTENs on its election's channel while it claims, waits for the lock
  or leads (not while it waits in line), and notifications arrive in commit order, so a follower
  can tell a release from a death (see *takeover*); it counts only what it heard since it last
  began listening. The release also
  reports whether another session waits for the key; if one does, ``close()`` waits (at most 50
  ms) for that successor's ``'leading:<token>'``, sent by its term's first confirmation after its
  child started, before it ends our session: a backend's exit costs the server milliseconds of
  CPU, and our process usually exits next, which would otherwise compete with the successor's
  claim and child start.

Takeover
--------
A session can end under a leader that is still running: ``pg_terminate_backend``, a connection
killer. The server then frees the lock before that leader's child has stopped (a daemon may need
seconds to honour SIGTERM), or while the leader's process is paused and hears nothing at all. So
a follower granted the lock leads at once only with proof that the previous term's child can no
longer run:

* **released**: it reads the channel's notifications up to its own ``claimed:<token>``. Its
  predecessor is the last claim it saw before its own (or, if it saw none, whoever held the lock
  when its wait began). If that term's ``released:`` followed, the old child had stopped.
* **ended, not by a termination**: a backend releases its locks, then counts its disconnect in
  ``pg_stat_database`` (``sessions_killed`` for a termination, ``sessions_abandoned`` for a
  vanished client such as a SIGKILLed leader, ``sessions_fatal`` for ``idle_session_timeout``),
  and only then leaves ``pg_stat_activity``. The wait statement read ``sessions_killed`` before
  queueing; once the predecessor's pid has left pg_stat_activity, an unchanged count proves it
  was not terminated: its process died (thread children with it; process children by their
  parent-death signal or their deadline), or the server ended it for silence, which happens
  only after its deadline (see the lease arithmetic). This needs a predecessor that *led*
  (announced ``leading:<token>``, or whose last statement carried a leader record): a session
  that held the lock while waiting out its own predecessor's lease (below) proves nothing about
  that predecessor's child by ending.

Otherwise (a termination anywhere in the database meanwhile, a statistics reset, ``track_counts =
off``, an unknown predecessor or one that never led, no proof within ``_PROOF_WAIT``) the
follower holds the lock **without leading until the predecessor's deadline has certainly
passed**. The bound: the predecessor's deadline is at most ``B - margin`` after the start ``t0``
of its last confirming statement (see the lease arithmetic); that statement reached the server
before the session was terminated, the termination freed the lock, and the lock was granted to
us before our wait statement returned, so before the monotonic instant ``g`` we read next. So the
deadline has passed by ``g + B - margin`` on the predecessor's clock, and we wait until ``g + B``
(the margin absorbs the two clients' clock rates). This assumes every contender of an election
has the same lease. Meanwhile the follower confirms its session every ``confirm_interval`` (the
server ends a session idle for ``lease``; a confirmation also finds out if our own session was
ended), ``claim()`` answers "lost", and a stop or close ends the wait at once (closing the
session frees the lock; the next follower, seeing a session that never led, waits again). The
debt is remembered: if the session ends during the wait, the next claim, on a new session, waits
out the rest. A dismissal names a leader, and a follower waiting out a lease is not one yet.

Cost: a new term starts about ``lease`` after a termination (10 s with the defaults) instead of
at once; a graceful handoff and a crash failover (SIGKILL, a dead host) cost nothing more.
``takeover_delay`` set to a number opts out of the guarantee: the follower waits that long and no
longer (0: it does not look for proof either), an assumption about how fast a told leader stops
its child; the fencing token is then the only protection.

A claim that was not queued (``pg_try_advisory_lock`` wins: a crown that starts or reconnects,
one that polls with ``monitor_leader=False``, a follower between two waits; e.g. after a
connection killer ended every session, followers' included) follows the same rule. A failed
claim reads, before trying the lock, ``sessions_killed``, then the holder: if the last claim on
this session failed (and the session has listened since), that is a baseline like a woken
follower's, and the same proof applies. Without a baseline (a new session, or one that stopped
listening to wait in line) or proof, the predecessor is unknown, and one more statement
after the grant (``_QUIET_SQL``) reads how long ago, by the server's clock, a termination we
cannot see may have ended a term of this election:

* now, while another session of this database may still be exiting from such a term: its last
  statement carries the election's tag (a leader's confirmations and a follower's lock wait,
  the only statements after which a session leads, begin with ``/* crown_sync_<key> */``), or
  cannot be read (another role's, without ``pg_read_all_stats``; ``track_activities`` off),
  unless it is queued for the lock right now (alive, not holding it). A backend counts its
  disconnect before it leaves pg_stat_activity, so once none is left, every such end is
  counted, in the count read next;
* then, if ``sessions_killed`` is 0: since the database's statistics were reset (never: no
  termination ever). A leader terminated before the reset had its deadline at most ``B -
  margin`` after its last confirmation, which preceded the termination, which preceded the
  reset; else (any termination counted, or ``track_counts = off``): now.

The child then waits until ``B - age`` after that statement's result (as after a restart). A
session that held the lock without leading (waiting out a debt) carries no tag and needs none:
its debt came from a term that was terminated (counted, or still exiting and tagged), from one
that ended otherwise (nothing to fear), or from a restart (a claim in an incarnation younger than
a lease reads its age: see below). Sessions ended by ``idle_session_timeout`` (``sessions_fatal``:
the leader was silent for ``B``, so its deadline has passed) or by a vanished client
(``sessions_abandoned``: its children die by their parent-death signal or at their deadline) are
not terminations and cost nothing. Cost: none on a database that never counted a termination; a
lease after a claim on a new session on one that did, until ``pg_stat_reset()``, after which a
new session waits only until a lease after the reset. A fast shutdown (``pg_ctl stop -m fast``,
a restart) terminates the sessions it finds and counts them as killed.

Restarts, crashes and failovers
-------------------------------
A server restart, a crash (a crashed backend makes the postmaster end every session and
reinitialise) or a failover ends every session, and the new incarnation knows nothing of the old
one's locks. A leader whose process is paused meanwhile keeps its child until its deadline, up to
``B - margin`` after its last statement, which the old incarnation served. So a claim (or a
waiter's grant) in an incarnation younger than ``B`` wins the lock but does not lead until ``B``
after the incarnation began: it holds the lock without leading, as above, in a thread (the claim
answers "lost" meanwhile). The claim statement itself reads the incarnation's age by the server's
clock (``_INCARNATION_AGE``: since the postmaster's start, since crash recovery discarded the
statistics, or since a promotion, conservatively), no extra round trip, and only when our own session is younger than ``B`` (an older
session proves an older incarnation). The old leader's last statement began before the
incarnation did, and the age was read before the result reached us, so ``B - age`` after that
result the old deadline has passed. On a freshly started server, too, the first leader waits
until the server is ``lease`` old.

Once leading, the waiter thread tells the engine with the term ready (its deadline counted from
the start of the wait statement, which proved the session: see below) and stays on as the
term's socket watcher; the claim asks for a refresh at once, which publishes the leader record
after the child has started.

The lease the server enforces (safety arithmetic)
-------------------------------------------------
A lock outlives its holder's usefulness in three ways, and the server is made to end each one
no sooner than ``lease`` seconds after the start of the holder's last statement:

* a paused (SIGSTOP, swap, GC) or partitioned leader whose TCP connection stays up: the session
  sets ``idle_session_timeout = lease`` (PostgreSQL 14+, settable by any user), so the server
  terminates it, and frees its lock, ``lease`` after it went idle;
* a vanished client (dead host, cable pulled): ``tcp_user_timeout = lease`` and server-side TCP
  keepalives with ``idle + interval * count >= lease``; Linux drops the connection no earlier
  than that after the last segment it received from us;
* a dead process on a live host: its kernel closes the socket and the lock is free at once
  (this is the fast crash failover).

After connecting, the contender reads these settings back (``SHOW`` reports the effective socket
values; zero means "does not apply", e.g. TCP settings over a unix socket) and takes ``B`` = the
smallest that applies. A statement that started at monotonic time ``t0`` and succeeded proves the
session (hence the lock) was alive at ``t0``, and every mechanism above measures from a moment
after ``t0``. So the server cannot give the lock to anyone before ``t0 + B``, and the term's
deadline is ``t0 + B - margin`` (``margin`` absorbs clock-rate differences between the two
hosts). A follower's lock wait that returned is such a statement too: its term's first deadline
counts from the start of the wait (unless less than ``confirm_interval`` of it is left, when it
confirms first; it also confirms first after waiting out a predecessor's lease or with unread
bytes on the socket, since the wait proves nothing against a termination that came after it). The
construction checks ``confirm_interval <= (lease - margin) / 2`` so that one failed
confirmation can be retried before the deadline, and connecting checks ``B >= lease``.

A frozen server (SIGSTOP, a hung VM) answers nothing while its kernel still ACKs, so no TCP
timeout fires and libpq would wait for good. So every statement of a contender is bounded on the
client too (``_common.bounded``: the process's warden thread shuts the socket down if it is still
in flight at its bound; the call then fails and the session is lost): a leader's confirmation at
``t0 + B`` of the previous confirmation, after the term's deadline, when ``idle_session_timeout``
could have ended the session anyway; any other statement (claim, first confirmation, lock wait
after ``wait_timeout``, release) ``B`` after it started, while no child of ours runs on the
session's lock (the release comes after the child stopped). A cut session ends like a vanished
client's (``sessions_abandoned``), and the argument above holds for it: nothing of ours runs on
its lock any more, so a successor may lead at once.

Lost lock without notice (``pg_terminate_backend``, a server restart, ``idle_session_timeout``,
a pooler's connection lifetime): while leading, a watcher thread polls the connection's socket
between our statements. Unsolicited bytes from an idle server are a goodbye (a FATAL message,
EOF), a notice, or a NOTIFY. On EOF or an ``E`` (error) message, peeked without reading, it calls
``on_change(lost=True)`` and the engine ends the term at once; otherwise it lets libpq read the
bytes (a failed read is a goodbye too: TLS hides the message type) and asks for a refresh only
for a dismissal. Should the watcher miss it, the next refresh, within ``confirm_interval``, sees
the broken connection or the missing lock and returns ``won=False``. A broken connection always
means lost leadership (a new session cannot inherit a lock), so refresh returns ``won=False``
rather than raising; other errors raise and the engine retries until the deadline. The next
claim reconnects (with a short tenacity backoff inside, and the engine's own backoff around it).
A claim that finds its session already ended by the server (a follower that stayed quiet longer
than ``lease``, e.g. with ``monitor_leader=False`` and ``monitor_delay > lease``) reconnects and
tries once more at once, instead of failing.

Tokens
------
The token is ``timeline << 48 | (xid & (2**48 - 1))``: the server's timeline (from the current WAL
file's name: 1, and one more after every promotion) above the low 48 bits of
``pg_current_xact_id()`` (a 64-bit, epoch-extended transaction id). Transaction ids rise
monotonically and survive restarts, but only those the server remembers: an xid whose commit
record was never flushed can be handed out again after a crash. A read-only transaction's commit
is not flushed, so the claim statement also writes a tiny transactional logical message (prefix
``crown_sync``, no table, no DDL; visible only to logical decoding consumers) which makes the
commit a flushed, synchronous one (``synchronous_commit = on`` is set for the session). The
token is taken after the lock is granted, so a later term's token is a later xid. A promoted
asynchronous standby that had not received the last WAL hands out xids its old primary already
used, but on a higher timeline, so its tokens are higher still. Bounds: 2**48 xids last 9 years
at a million transactions per second (89 at 100,000/s) from the cluster's creation; timelines
stay below 2**15, so the token a positive bigint, for 32,767 promotions. Tokens taken before this
format (bare xids, below 2**48) are lower than every new one. Assumed: the old primary accepts
no more transactions once the standby is promoted (fence it).

Leader record without DDL
-------------------------
``find_leader`` must name the holder (identity, metadata, token, since). Instead of a table
(DDL, privileges, rows outliving sessions, vacuum), the leader publishes its record in the text
of its own confirm statements, as a leading SQL comment ``/* crown_sync:v1:<base64 JSON> */``.
PostgreSQL shows a session's last statement in ``pg_stat_activity.query``, so readers join
``pg_locks`` (who holds the key) with ``pg_stat_activity`` (what that session last said). The
record therefore exists exactly as long as the lock does. Limits: the text is cut at
``track_activity_query_size`` bytes (1 kB by default; the record drops ``metadata`` rather than
be cut); other roles see it only with ``pg_read_all_stats``, and ``track_activities`` must be on.
When the record can't be read, ``find_leader`` still reports the holder, as
``"(unknown: backend pid N)"``.

dismiss
-------
``dismiss(name)`` sends ``NOTIFY`` on the election's channel naming the holder's backend pid and
token; the leader LISTENs on it and, woken by its socket watcher, refreshes and
steps down (child stopped first, then unlock). A leader that can't hear it (paused, partitioned)
keeps leading until its session ends; dismiss never kills a session, because that would free
the lock while the old child may still run. A dismissal naming another token (stale, forged) is
ignored; so dismiss() needs the leader's record (the crowns' role, or ``pg_read_all_stats``). A
holder of the crowns' role without a record (a successor waiting out a lease) is no leader yet:
dismiss() returns False. With ``track_activities`` off no record can be read: dismiss() sends a
dismissal naming no token and stays connected until the holder lets go (at most twice
``confirm_interval``); the leader asks, in its next confirm statement (``_sql._sender_trusted``),
whether the sender is a live session of a trusted role, and heeds it only then.

Sharing a server
----------------
Any session of the database may take any advisory lock, read ``pg_locks`` and every session's
pid and role, and LISTEN or NOTIFY on any channel: PostgreSQL has no privileges on these. Only
the sender's backend pid of a notification is the server's word. So a follower counts a
``claimed``/``released``/``leading`` notification only from a session that held or awaited the
lock at its wait's read (or the read before) and whose role has ours' privileges (``_sql._TRUSTED``);
a last claim from anyone else leaves the predecessor unknown (it waits out the lease). A holder
of another role without a leader record is reported as a foreign holder (``Leader`` identity and
metadata, a warning). LISTEN reveals every token, so a listening co-tenant can still dismiss a
leader; a database of the crowns' own with ``CONNECT`` revoked from ``PUBLIC`` is the boundary
(docs/sharing.rst).

Refused, with a clear error
---------------------------
* a server in recovery (a hot standby grants advisory locks too): checked at connect and in
  every claim and confirm (use ``target_session_attrs=read-write`` with several hosts);
* any connection pooler or protocol-level proxy (PgBouncer, Pgpool-II, RDS Proxy, ... in any
  mode). The guarantees above need the server session to be ours alone and to end exactly when
  our connection ends: a transaction or statement pooler sends consecutive statements to
  different sessions; in transaction mode PgBouncer, by default (``server_round_robin = 0``),
  hands the most recently freed session to whoever asks next, so a quiet contender's session
  (lock included: advisory locks are re-entrant) is given to a second contender, and both would
  lead without any statement seeing another pid; and even in session mode the server-side
  timeouts guard the pooler's connection, not ours. At connect, the backend pid the server
  announced in the startup BackendKeyData (``conn.info.backend_pid``; a pooler sends its own)
  must equal ``pg_backend_pid()``; the session also sets a random marker with
  ``set_config('crown_sync.session', ...)`` and every statement checks that the marker and the
  backend pid are still ours. A plain TCP forwarder (which passes the server's own messages
  through) is not detected, and is fine as long as it does not cut idle connections sooner than
  ``lease``;
* PostgreSQL older than 14 (no ``idle_session_timeout``).

On PostgreSQL 14 the statistics collector counts disconnects asynchronously, so neither proof
through ``sessions_killed`` holds: every takeover but a release waits out a lease there.

NOT guaranteed: a follower whose lease differs from its predecessor's; an explicit
``takeover_delay``; ``track_counts`` turned off for the terminated leader's session alone. Pass the fencing token to the resource you protect. Failover to a
old primary that still accepts statements after its standby was promoted (split brain). Key collisions with other applications'
advisory locks in the same database (see :func:`advisory_key`).

Fork: a forked child gets copies of the connections' sockets. In the child we ``dup2``
``/dev/null`` over them, so nothing sent later (psycopg's goodbye on garbage collection) reaches
the parent's sessions, and mark every object unusable (the contender's FORKED phase).

The package: ``_common`` (options, errors, the key, the record's encoding, socket helpers),
``_sql`` (every statement), ``_oracle`` (:class:`PostgresOracle`), ``_session`` (connecting a
contender's session and its checks), ``_contender`` (:class:`PostgresContender`: claim, confirm,
release) and its parts ``_waiter`` (the follower's waiter thread), ``_takeover`` (the proof and
the debt) and ``_watcher`` (the leader's socket watcher).
"""

from ._common import OPTIONS, PoolingDetected, PostgresOracleError, StandbyRefused, advisory_key
from ._common import _key_parts, _lease_ms, _shutdown  # noqa: F401 (tests and benchmarks use them)
from ._contender import PostgresContender
from ._oracle import PostgresOracle
from ._sql import _INCARNATION_AGE  # noqa: F401 - crown_sync.testing.postgres_server reads it

__all__ = [
    "PostgresOracle",
    "PostgresContender",
    "advisory_key",
    "PostgresOracleError",
    "StandbyRefused",
    "PoolingDetected",
]
