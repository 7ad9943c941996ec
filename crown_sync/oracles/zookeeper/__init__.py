"""ZooKeeper oracle: ephemeral sequential nodes, one queue per election, SUSPENDED is loss.

Layout: election ``NAME`` lives under ``<path_prefix>/NAME`` (default ``/crown_sync/NAME``, inside
the URL's chroot if any). Every contender creates one ephemeral sequential node there, named
``<32 hex of a per-contender uuid>-<10-digit sequence>``, holding a JSON record ``{identity,
metadata, since}``. The node with the lowest sequence leads, and a node hosts at most one term:
after its term the contender deletes it and queues again with a fresh one.

Each follower watches only the node just before its own (an ``exists`` watch), so a leader's exit
wakes one contender, not the herd. A follower whose predecessor leads (it saw it first in the
queue) knows, when that node goes, that it is now first, since nodes are only ever added at the
back: it takes over without asking the server anything (see "deadline" below). Other followers,
woken because the follower before them left, ask for the queue at once from kazoo's thread.
Every contender also watches the data of its own node: ``dismiss()`` writes a dismissal request
(naming the node's token) into the record of the node first in the queue, and its owner ends its
term, stops its child and only then deletes its node; a node dismissed before it led never leads.
``dismiss()`` does not delete the node itself: the successor would start at once, while the
dismissed leader's child still runs. A deletion of our node by anyone else ends our term too.

Next to its queue node every contender keeps one ephemeral *guard* node, ``<uuid>-guard``
(created right after its queue node, pipelined with the reads that follow; a term never starts
without it), holding ``{identity, session_timeout}``. A contender deletes its guard only when no
child of its runs: just before it deletes a spent node (abdicate, close, a dismissed node), or at
once when a node that never hosted a term is deleted under it; the end of its session deletes it
too. So a guard without its contender's queue node (an *orphan*) means that someone else deleted
the node, under a contender whose child may still run. A leader record is at most
``MAX_RECORD_BYTES`` of JSON (with ``since`` and a dismissal request in it: ZooKeeper refuses
requests over its 1 MiB ``jute.maxbuffer``); bigger metadata is a ValueError when the contender is
built, as is an election name or path ZooKeeper refuses.
kazoo's ``Lock``/``Election`` recipes are not used: a non-blocking ``Lock.acquire`` gives up its
queue position, ``Election.run`` never interrupts the function, and ``Lock.is_acquired`` stays
True after the session is gone; we compose kazoo's primitives instead (ephemeral sequential
``create``, ``get_children``, one-shot watches, state listeners, KazooRetry for reconnection).

Safety argument:

* ZooKeeper deletes an ephemeral node when its owner deletes it, when its session expires (only
  after the server heard nothing from it for the negotiated session timeout ``T``), or when
  someone else deletes it (see "revocation" below). A new node always sorts after every existing one, so while our node exists and is lowest
  nobody else can be lowest: at most one contender sees itself first.
* A term's deadline is ``t0 + 0.75 T - 50 ms`` where ``t0`` is the start of a request on our
  session that the server answered (the claim's ``get_children``; for a refresh, the session's
  *proof* or an ``exists`` of our node, below; for the round-trip-free takeover, the latest
  answered request of the session: while a contender is next in line the oracle makes sure there
  is one every T/4, and the takeover falls back to asking when the latest is more than T/3 old).
  The server had the session after ``t0``, so it cannot expire it, delete our node and let a
  successor in before ``t0 + T``; the engine stops our child by the deadline even if this process
  is paused (SIGSTOP, swap) and this module never runs again. ``T`` is the timeout the server
  actually negotiated (lower than requested when the server's ``maxSessionTimeout`` is lower): we
  read it from kazoo's connection handshake, falling back to the requested value.
* One confirmation per session, not per leader (:mod:`._refresh`): while leaders of the session
  refresh, the session sends one ``exists`` (of the path prefix) every T/6, and publishes its
  start as the session's proof only once every watch event kazoo read before its answer has been
  handled (kazoo's one callback thread runs them in the server's order; the publication is
  queued behind them). A leader's refresh takes the latest proof, if at most T/3 old (else it
  asks for a new one and waits, never past its deadline), only if the data watch on its node was
  set by a read sent, in the same connection, before the proof's request, that found the node
  its session's, and has not fired since. The server answers a connection's requests in order
  and sends a watch's event before the answer to any later request: had the node been deleted
  (or changed: a dismissal) before the server answered the proof, the refresh would see the
  event's effect (term ended, or the watch unarmed). So the proof shows what an ``exists`` of
  the node would have shown, from the same start. While its watch is being re-armed (after a
  change of the node: the term's first refresh, which writes ``since``; a dismissal), a leader
  sends an ``exists`` of its own, as every refresh did before.
  A session runs at most ``CLAIMS_IN_FLIGHT`` claims at a time (the server answers a session's
  reads after the writes sent before them: a burst of claims would hold every refresh back past
  its deadline).
* kazoo reports SUSPENDED when it stops hearing the server (after 2/3 T) and LOST only once it
  reconnects to learn that the session expired, which during a partition never happens before the
  server has handed the crown on. So SUSPENDED ends the term at once (``on_change(lost=True)``),
  and ``refresh()`` answers ``won=False`` whenever the client is not CONNECTED or the connection
  has dropped since the term began. After a reconnect with the same session, a node is used again
  only if it still exists, its ``ephemeralOwner`` is our session and it has not hosted a term yet
  (a follower keeps its place); a leader's node is deleted and the contender queues again. A
  term's win re-checks the connection under the contender's lock, so a SUSPENDED that lands
  between the claim's last look and its win fails the claim instead of starting a term that no
  loss signal would end. A spent node that ``abdicate()`` could not delete while cut off is
  deleted as soon as the same session is back (asynchronously, from kazoo's state listener, only
  if its ``ephemeralOwner`` is still our session), so the next in line does not wait for our next
  claim.
* Revocation. A watcher cannot tell who deleted a node: its owner after its child stopped, the
  server at its session's expiry (its deadlines have passed: above), or an administrator
  (``delete`` in zkCli) under a live leader whose child runs on. The guard tells them apart. The
  round-trip-free takeover happens only if the leader's guard was seen deleted before its node
  (the next in line watches the leader's guard too; an owner deletes its guard and its node in
  one transaction, the guard first, and a client sees the watch events of a ``multi`` in the
  order of its operations, checked on the real server); otherwise the claim lists the
  election. A contender first in the queue starts only if the listing shows no orphan guard.
  Else it holds back: it watches each orphan guard and claims again when one goes (its owner saw
  its node deleted, which ended its term, stopped its child, then dropped the guard; or its
  session expired) or when ``0.75 T'`` (``lease_for(T')`` plus its 50 ms margin, for the child's
  kill to land) has passed since the END of the first listing that showed the orphan, ``T'``
  being the session timeout in the guard's record (the owner's requested one: its leases use
  the negotiated one when lower, never more).
  Every confirmation of the revoked term was answered while its node existed (its own
  ``exists``, or a proof that its watch would have beaten had the node gone first), so it started
  before the deletion, which the listing's end follows: by then the term's deadline has passed.
  Costs: a release and a crash failover are as fast as before (a session's expiry deletes node
  and guard in one transaction; if the node's event comes first the takeover costs one listing);
  a revocation costs the time the revoked leader's child takes to stop (never past its
  deadline), or, if its process is paused, the earlier of ``0.75 T'`` and the expiry of
  its session.
* Dismissal never hands the crown over by itself: the successor still waits for the leader's
  node to go, which the leader does after its child stopped (or its session expires). The request
  is never moved on to another node: if its target left before it was written, it stepped down
  already.
* Fencing token: the leader node's ``czxid`` (the zxid of its creation). Nodes lead in the order
  they were created, each at most once, and zxids rise across the whole ensemble and survive
  re-creation of the election's node (sequence numbers do not; they are never tokens). So tokens
  rise from term to term, and ``find_leader`` reports the current term's token exactly.

What is NOT guaranteed:

* The ensemble must satisfy ``syncLimit x tickTime <= T / 4`` (so ``T >= 4 x tickTime``;
  ZooKeeper's default ``tickTime`` is 2 s: use sessions of 10 s or more). Checked once per
  connection from the member's ``conf`` (a four-letter word: it must be in the server's
  ``4lw.commands.whitelist``): a violation makes ``claim()`` raise ZooKeeperMisconfigured with the
  numbers, which the engine reports (``status().last_error``) and retries like an unreachable
  server; an unreadable ``conf`` is logged once and not checked. The ZooKeeper leader
  (which expires sessions) tracks them in ``tickTime`` steps and hears of our requests to another
  member at that member's next ping: both make an expiry later, not earlier. But a member cut off
  from the quorum keeps answering our reads for up to ``syncLimit x tickTime`` before it notices
  and drops our connection; a refresh it answers never reaches the ZooKeeper leader, whose expiry
  counts from the last request it heard of (the session sends one at least every ``T / 3``: the
  proof every ``T / 6`` while it has leaders, kazoo's pings besides; and the member
  passes it on within ``tickTime / 2``), so it may expire the session ``2/3 T - tickTime / 2``
  after the cut, at least about ``0.54 T`` with the condition. With the condition, the dropped
  connection (SUSPENDED) ends a running leader's term by ``T / 4`` after the cut, so its child has
  about ``0.29 T`` to honour SIGTERM; a child slower than that (its grace is bounded only by the
  term's deadline, which such a refresh may have carried past the expiry), or a leader process
  paused at that same moment, is not covered (the fencing token is the defence).
* Clock rates: the deadline is local time (:func:`crown_sync.clock.monotonic`, which counts a
  host suspend) against the server's idea of ``T``.
* Tokens rise only while the ensemble keeps its data (a wiped data directory restarts zxids;
  ``forceSync=no`` servers can lose acknowledged writes in a power failure: not checkable).
* Deleting a leader's guard by hand as well as its node (``deleteall`` of the election, say)
  voids the revocation proof: the successor starts as after a release. So does a fleet mixing
  this version with older ones (their nodes have no guards). Use ``dismiss``.
* Work in flight when a deadline passes can land after a successor started: pass ``term.token``
  to the protected resource and let it reject stale tokens.

Connection loss: SUSPENDED ends a leader's term at once; followers keep their nodes and are
nudged to look again after the reconnect. A refresh waits for its answer no longer than the
term's deadline (after it, the answer is of no use), which bounds a ``stop()`` against a frozen
server. Unreachable servers make ``claim()`` raise after ``CLAIM_CONNECT_WAIT`` (the engine backs
off and retries) while kazoo keeps reconnecting in the background with its own KazooRetry. ``close()`` deletes our node
when it can and stops the client when the last contender of a closed oracle goes, bounded in time
even on a dead server.

Fork: the client is created lazily, in the process that uses it. A forked child that inherits an
oracle gets its sockets replaced by ``/dev/null`` (``dup2``), so nothing it does can send a
goodbye on the parent's session; its inherited contenders become unusable and the oracle builds a
fresh client if the child uses it.

Code: :mod:`._session` (the kazoo session an oracle's contenders share, and its proof),
:mod:`._refresh` (a leader's refresh), :mod:`.oracle`
(:class:`ZooKeeperOracle`), :mod:`.contender` (:class:`ZooKeeperContender` and its phases),
:mod:`._guard` (guard nodes and the wait for an orphan's lease), :mod:`._watches` (the watches on
our own node and on our predecessor), :mod:`._release` (deleting spent nodes), :mod:`._common`.
"""

from ._common import (  # noqa: F401 - the names this module always had
    CLAIM_CONNECT_WAIT,
    CLOSE_TIMEOUT,
    CONF_TIMEOUT,
    LEASE_FRACTION,
    LEASE_MARGIN,
    MAX_RECORD_BYTES,
    PUBLISH_DELAY,
    REFRESHES_PER_TIMEOUT,
    ZooKeeperMisconfigured,
    ZooKeeperUnavailable,
    _record_size,
    oracle_timeout,
)
from .contender import ZooKeeperContender
from .oracle import ZooKeeperOracle

__all__ = ["ZooKeeperOracle", "ZooKeeperContender", "ZooKeeperUnavailable", "ZooKeeperMisconfigured"]
