"""NATS JetStream KV oracle: a lease record in a KV bucket, claimed with ``create`` and renewed and
released only by ``update`` with the last revision (compare-and-set).

For fleets that already run NATS with JetStream (Choria's election store). One key per election,
``<key_prefix><name>`` in the bucket ``bucket`` (default ``crown_sync``), holds a JSON lease
record; how a lease lives and dies, and why no two terms overlap, is the argument of
:mod:`crown_sync.oracles._lease`, which this oracle runs on KV ``create`` (only if the key has no
value: absent, deleted or purged), ``get`` (value and revision) and ``update(last=revision)``.

Why not the issue's first sketch (a key deleted by its holder, a bucket TTL as the lease): a key
deleted or purged by an administrator, a bucket deleted and recreated, or a record aged out by
the bucket's ``max_age`` all look exactly like a clean release to whoever finds the key empty,
while the old leader's child may still run. So the holder's own release is a ``released`` record
written by CAS, never a delete, and an empty key means "unknown": the claimant holds a
``pending`` record for one ``ttl`` before it starts (the quarantine of ``_lease``). The bucket's
``max_age`` (default a day) only collects abandoned records; the lease is timed on the
contenders' own clocks, never by the server's expiry.

Heirs: the oracle's one connection (shared by all its contenders) joins, for each election it
follows, a queue group on the election's heir subject. A release is published there, and NATS gives
it to ONE member: that process alone wakes, and its following crowns read the key at once and take
the release over (the offer says only "look now": a forged one costs a read). No other follower
hears of the release or of the takeover: they read the key every ``poll_interval``, which is also
how a crash (a record unchanged for a ``ttl``), a delete or a purge is found. So a handoff wakes
one process whatever the number of followers, and a crash is found by followers at their own
poll times, not all at once. The holder renews and releases by ``update`` over the revision of its
own last write, without reading first: a graceful handoff is one request on the leader's side and
two (a read, an update) on the heir's.

Fencing tokens: ``record token + 1`` when a term replaces a record (see NatsOracle.term_token), and
on an empty key ``created + last_seq + 1``, where ``created`` is the
bucket stream's creation time in microseconds (the server's clock) and ``last_seq`` the stream's
last revision, read when a term is about to start: the token is at most the revision of the write
that starts the term, offset by the bucket's creation time. Revisions rise across terms and across
restarts (file storage); a bucket deleted and recreated restarts its revisions at 1, but its
creation time is later by the old bucket's lifetime, which in microseconds exceeds any number of
revisions a bucket can have taken. See docs/oracles/nats.rst for the full argument and its one
assumption (the server's wall clock does not step back across a recreation).

nats-py is asyncio-only: each oracle runs one private event loop in a daemon thread, and every
call is a coroutine sent to it and waited for with a timeout, so the API stays synchronous. A
forked child never touches that loop or its sockets: they are recorded with
:mod:`crown_sync._forksafe` when made (blinded in the child) and a new loop is made on demand.
nats-py's own reconnection is off: a broken connection is dropped and the next call makes a new
one (under the fork guard), so no request is queued while disconnected and sent later.
"""

import asyncio
import concurrent.futures
import datetime
import logging
import os
import re
import threading
import time
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

from .. import _forksafe
from ..urls import one_server, parse_options, redact_text
from ._base import seconds
from ._lease import URL_OPTIONS, LeaseContender, LeaseOracle, LeaseStore, record_token
from ._tls import client_context

import nats  # the nats extra: crown_sync.urls reports it missing with the pip command
import nats.errors
import nats.js.errors
from nats.js.api import KeyValueConfig, StorageType

__all__ = ["NatsOracle", "NatsError"]

logger = logging.getLogger("crown_sync.oracles.nats")

_OPTIONS = dict(URL_OPTIONS, bucket=str, bucket_max_age=float, tls_ca=str, tls_cert=str, tls_key=str)

# NATS KV: a key is subject tokens of these characters, a bucket a single token.
_KEY_CHARS = re.compile(r"^[-/_=.a-zA-Z0-9]*$")
_BUCKET = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_REVISION, _HOPS = "Crown-Sync-Revision", "Crown-Sync-Hops"
_MICROSECOND = datetime.timedelta(microseconds=1)


class NatsError(ConnectionError):
    """NATS could not be reached, refused us, or answered an error (the message names the server)."""


class _Loop:
    """One private asyncio event loop running in a daemon thread."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self.pid = os.getpid()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def submit(self, coro) -> "concurrent.futures.Future":
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        try:
            self.submit(self._shutdown())
        except RuntimeError:  # already closed
            return
        if self.thread is not threading.current_thread():
            self.thread.join(2.0)
            if not self.thread.is_alive():
                self.loop.close()

    async def _shutdown(self) -> None:
        # Connections' closes and nats-py's consumer tasks end here, not as "destroyed pending".
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        self.loop.stop()


class _Store(LeaseStore):
    """The oracle's one NATS connection (made on demand on the oracle's loop), shared by its
    contenders (nats-py multiplexes concurrent requests on it), and a membership of each watched
    key's heir group that nudges the key's watchers when this process is offered a release."""

    def __init__(self, oracle: "NatsOracle"):
        self._oracle = oracle
        self._nc = None  # a nats.aio.client.Client, touched only on the loop
        self._kv = None
        self._loop: Optional[_Loop] = None
        self._connecting = threading.RLock()  # one thread (re)connects; the others wait for it
        self._inflight: "weakref.WeakSet[concurrent.futures.Future]" = weakref.WeakSet()
        self._watches: Dict[str, List[Any]] = {}  # key -> its watchers (LeaseContenders)
        # key -> (its heir subscription, or None while out of the group,), or a marker while it
        # is made (on the loop)
        self._subscriptions: Dict[str, Any] = {}
        self._offering: "weakref.WeakSet[concurrent.futures.Future]" = weakref.WeakSet()  # heir offers in flight
        self._written = threading.local()  # each thread's last successful write and its revision
        self.last_error: Optional[str] = None  # the last error nats-py reported, for messages
        self.closed = False

    # -- the store interface ------------------------------------------------------------------

    def read(self, key: str) -> Tuple[Optional[bytes], Any]:
        return self._call("read", self._read(key))

    def create(self, key: str, value: bytes, expire: int) -> bool:
        # expire: the bucket's max_age applies to every key alike (per-key TTLs need 2.11).
        return self._wrote(value, self._call("create", self._create(key, value)))

    def replace(self, key: str, value: bytes, version: Any, expire: int) -> Optional[bool]:
        if not version:
            return None  # update(last=0) would CREATE the key: never
        return self._wrote(value, self._call("update", self._update(key, value, version)))

    def _wrote(self, value: bytes, outcome: Tuple[Any, Optional[int]]) -> Any:
        """Remember, for the calling thread, the revision a successful write got."""
        done, revision = outcome
        if revision is not None:
            self._written.last = (value, revision)
        return done

    def entries(self, prefix: str) -> Dict[str, Optional[bytes]]:
        return self._call("list", self._entries(prefix))

    def token_floor(self) -> int:
        """The bucket's creation time in microseconds plus its last revision plus one."""
        return self._call("stream info", self._token_floor())

    def read_many(self, keys: List[str]) -> Dict[str, Tuple[Optional[bytes], Any]]:
        return self._call("read", self._read_many(keys))

    def written_version(self, value: bytes) -> Any:
        written = getattr(self._written, "last", None)
        return written[1] if written is not None and written[0] == value else None

    def watch(self, key: str, watcher: Any) -> None:
        """From now on, call ``watcher.nudge()`` (on the loop) when this process is offered a
        release of ``key`` (see LeaseContender.nudge; ``watcher.watching`` tells whether it
        follows now); the key's heir subscription is (re)made with each connection."""
        with self._connecting:
            self._watches.setdefault(key, []).append(watcher)
            connected = self._nc is not None
        if connected:
            try:
                self._call("watch", self._subscribe(key))
            except BaseException:
                self.unwatch(key, watcher)  # the caller watches again (and adds it again) on retry
                raise

    def unwatch(self, key: str, watcher: Any) -> None:
        """Stop nudging ``watcher``; the key's subscription goes with its last watcher (never raises)."""
        with self._connecting:
            watchers = self._watches.get(key, [])
            if watcher in watchers:
                watchers.remove(watcher)
            if watchers:
                return
            self._watches.pop(key, None)
        self._submit_quietly(self._unsubscribe(key))  # (no loop: the consumer went with it)

    def _submit_quietly(self, coro) -> None:
        """Run ``coro`` on this process's loop, without waiting; dropped if there is none."""
        loop = self._loop
        if loop is not None and loop.pid == os.getpid() and not self.closed:
            try:
                loop.submit(coro)
                return
            except RuntimeError:  # the loop stopped meanwhile
                pass
        coro.close()  # never awaited: no warning for it

    def interrupt(self) -> None:
        self.closed = True
        for inflight in list(self._inflight):
            inflight.cancel()  # the waiting threads get CancelledError at once
        self._drop()

    def close(self) -> None:
        self.closed = True
        concurrent.futures.wait(list(self._offering), timeout=0.5)  # a last release's heir offer
        self._drop(wait=0.5)  # a clean goodbye if the server answers soon; never longer
        self._oracle._store_closed(self)

    def after_fork_in_child(self) -> None:
        # The parent's connection and loop: never touch them (the sockets are blinded).
        self._nc = self._kv = self._loop = None
        self._connecting = threading.RLock()
        self.closed = True

    # -- plumbing -----------------------------------------------------------------------------

    def _call(self, what: str, coro) -> Any:
        if self.closed:
            coro.close()
            raise RuntimeError("NATS store is closed")
        oracle = self._oracle
        submitted = False
        nc = None
        self.last_error = None  # a permissions violation arrives during the call it fails
        try:
            with self._connecting:
                if self._nc is None or self._nc.is_closed or self._loop is not oracle._current_loop():
                    what, op = "connect", what
                    self._connect()
                    what = op
                nc, loop = self._nc, self._loop
            future = loop.submit(coro)
            self._inflight.add(future)
            submitted = True
            try:
                return future.result(oracle.timeout + 0.5)  # nats-py times out first, at timeout
            except concurrent.futures.TimeoutError:
                future.cancel()
                raise asyncio.TimeoutError() from None
        except NatsError:
            raise
        except Exception as exc:
            # A call that timed out leaves the connection to the others that share it (under load
            # one slow answer must not cut them all off): nats-py's pings close a connection whose
            # server stopped answering, and the next call connects afresh. Anything else (a closed
            # connection, a bucket deleted under us: no stream answers) starts afresh now: a new
            # connection finds or recreates the bucket.
            if not isinstance(exc, (asyncio.TimeoutError, nats.errors.TimeoutError)):
                self._drop(only=nc)
            raise oracle._error(what, exc, self.last_error) from None
        finally:
            if not submitted:
                coro.close()  # never awaited (the connection failed): no warning for it

    def _connect(self) -> None:
        oracle = self._oracle
        for stale in list(self._inflight):
            # Calls still waiting on the connection being replaced (a request sent just before the
            # server went away gets no answer until its timeout): fail them now, so that the
            # poller's read does not leave every follower deaf for a whole timeout.
            stale.cancel()
        self._drop()
        loop = oracle._current_loop(make=True)
        # A fork waits until the socket is made and recorded (crown_sync._forksafe).
        with _forksafe.opening() as keep:
            future = loop.submit(oracle._open(self))
            try:
                self._nc, self._kv = future.result(oracle.connect_timeout + oracle.timeout + 1.0)
            except concurrent.futures.TimeoutError:
                future.cancel()
                raise asyncio.TimeoutError() from None
            self._loop = loop
            sock = _socket_of(self._nc)
            if sock is not None:
                keep(sock)
        self._subscriptions = {}  # the last connection's went with it
        try:
            for key in list(self._watches):
                self._loop.submit(self._subscribe(key)).result(oracle.timeout + 0.5)
        except BaseException:
            # A connection without its subscriptions would leave the followers deaf to offers for as
            # long as it lives (a restarted server's JetStream may not answer yet): connect anew
            # at the next call instead.
            self._drop()
            raise
        for watchers in list(self._watches.values()):
            for watcher in list(watchers):
                watcher.nudge()  # changes while we were not connected went unheard: look now

    def _drop(self, wait: float = 0.0, only: Any = None) -> None:
        """Drop the connection (``only``: if it is still that one; another thread may have
        connected anew since)."""
        with self._connecting:
            nc, loop = self._nc, self._loop
            if only is not None and nc is not only:
                return
            self._nc = self._kv = None
        if nc is not None and loop is not None and loop.pid == os.getpid() and not loop.loop.is_closed():
            try:
                closing = loop.submit(_close_quietly(nc))  # a frozen server must not hold us long
            except RuntimeError:  # the loop stopped meanwhile
                return
            try:
                closing.result(wait)
            except Exception:  # still closing in the background, or failed: either way, gone
                pass

    # -- coroutines (run on the loop) ---------------------------------------------------------

    async def _read(self, key: str) -> Tuple[Optional[bytes], Any]:
        try:
            entry = await self._kv.get(key)
        except nats.js.errors.KeyNotFoundError:  # absent, deleted or purged
            return None, None
        return entry.value, entry.revision

    async def _read_many(self, keys: List[str]) -> Dict[str, Tuple[Optional[bytes], Any]]:
        reads = await asyncio.gather(*(self._read(key) for key in keys))  # concurrent requests
        return dict(zip(keys, reads))

    async def _entries(self, prefix: str) -> Dict[str, Optional[bytes]]:
        # One ordered consumer delivers the last value of every key, then None: the bucket at once.
        watcher = await self._kv.watchall(ignore_deletes=True)
        found = {}
        try:
            async for entry in watcher:
                if entry is None:
                    break
                if entry.key.startswith(prefix):
                    found[entry.key] = entry.value
        finally:
            await watcher.stop()
        return found

    async def _create(self, key: str, value: bytes) -> Tuple[bool, Optional[int]]:
        try:
            return True, await self._kv.create(key, value)
        except nats.js.errors.KeyWrongLastSequenceError:
            return False, None

    async def _update(self, key: str, value: bytes, version: int) -> Tuple[Optional[bool], Optional[int]]:
        try:
            return True, await self._kv.update(key, value, last=version)
        except nats.js.errors.KeyWrongLastSequenceError:
            # Changed since our read, or emptied (a delete or purge leaves a marker revision).
            value, _ = await self._read(key)
            return (None if value is None else False), None

    async def _token_floor(self) -> int:
        info = await self._nc.jetstream(timeout=self._oracle.timeout).stream_info(self._oracle.stream)
        created = info.created or _EPOCH
        return (created - _EPOCH) // _MICROSECOND + (info.state.last_seq or 0) + 1

    async def _subscribe(self, key: str) -> None:
        if key in self._subscriptions:
            await self._rejoin_heirs(key)  # if a release here left the heir group
            return  # one subscription per key and connection, whatever the number of watchers
        making = self._subscriptions[key] = object()  # a watch of the key meanwhile makes no second
        heir = None
        try:
            # A release is published to a queue group of the key's watching processes, and NATS
            # gives it to ONE of them (the heir), which alone wakes, reads and takes it over.
            heir = await self._nc.subscribe(self._oracle.heir_subject(key), queue="crown_sync", cb=self._heir)
        finally:
            if self._subscriptions.get(key) is making and heir is not None:
                self._subscriptions[key] = (heir,)
            else:  # failed, or reconnected meanwhile (another connection's): none of it stays
                if self._subscriptions.get(key) is making:
                    del self._subscriptions[key]
                await _unsubscribe_quietly((heir,))
        if key not in self._watches:
            await self._unsubscribe(key)  # its last watcher left while it was being made

    async def _heir(self, msg) -> None:
        headers = msg.headers or {}
        key = msg.subject[len(self._oracle.heir_subject("")):]
        # The offer only says "look now": the watchers read the key and take over a release they
        # find there. Never the message's own record, which any client allowed to publish on the
        # subject could forge (a "released" over a held lease's revision would win a CAS).
        taken = [watcher.nudge() for watcher in list(self._watches.get(key, ()))]
        hops = int(headers.get(_HOPS, "0"))
        if not any(taken) and hops < 3:
            # Nobody here follows the key now (the releasing process itself, or its new leader's):
            # pass it on to another member of the group; past three hops the others' polls find it.
            await self._nc.publish(msg.subject, msg.data, headers={_REVISION: headers.get(_REVISION, "0"),
                                                                   _HOPS: str(hops + 1)})

    def publish_heir(self, key: str, releaser: Any) -> None:
        """Offer the release this thread just wrote to the key's heir (never raises, no wait);
        ``releaser``: the releasing contender."""
        written, loop, nc = getattr(self._written, "last", None), self._loop, self._nc
        if written is None or loop is None or nc is None:
            return
        try:
            offering = loop.submit(self._offer(nc, key, written, releaser))
        except RuntimeError:  # the loop stopped meanwhile: the followers' polls find the release
            return
        self._offering.add(offering)  # close() lets it reach the server first

    async def _offer(self, nc, key: str, written: Tuple[bytes, int], releaser: Any) -> None:
        made = self._subscriptions.get(key)
        if nc is self._nc and isinstance(made, tuple) and made[0] is not None and list(self._watches.get(key, ())) == [releaser]:
            # No other crown here follows the key: leave the group before offering (the server
            # reads our UNSUB first), or NATS may pick this process, which often exits right
            # after its release (a SIGTERMed job) before passing the offer on: a lost handoff.
            self._subscriptions[key] = (None,)
            await _unsubscribe_quietly(made[:1])
        try:
            await nc.publish(self._oracle.heir_subject(key), written[0],
                             headers={_REVISION: str(written[1]), _HOPS: "0"})
            # nats-py's close() drops what its flusher has not written yet: have it written.
            await nc.flush(timeout=self._oracle.timeout)
        except Exception as exc:  # the followers' polls find the release
            logger.debug("%s: heir offer of %s failed: %s", self._oracle.description, key, exc)

    async def _rejoin_heirs(self, key: str) -> None:
        """Back in the key's heir group once a crown here follows it again (after _offer left)."""
        subscriptions, nc = self._subscriptions, self._nc
        made = subscriptions.get(key)
        if nc is None or not isinstance(made, tuple) or made[0] is not None:
            return
        subscriptions[key] = making = object()  # no second rejoin meanwhile
        heir = None
        try:
            heir = await nc.subscribe(self._oracle.heir_subject(key), queue="crown_sync", cb=self._heir)
        except Exception as exc:  # the connection is going: the next one subscribes anew
            logger.debug("%s: could not rejoin the heirs of %s: %s", self._oracle.description, key, exc)
        if self._subscriptions is subscriptions and self._nc is nc and subscriptions.get(key) is making:
            subscriptions[key] = (heir,)
            if key not in self._watches:
                await self._unsubscribe(key)  # its last watcher left meanwhile
        else:  # reconnected meanwhile: that connection made its own
            await _unsubscribe_quietly((heir,))

    def rejoin_heirs(self, key: str) -> None:
        """A contender here follows ``key`` again: back in its heir group if _offer left it (no
        wait, never raises)."""
        self._submit_quietly(self._rejoin_heirs(key))  # (no loop: the next connection subscribes)

    async def _unsubscribe(self, key: str) -> None:
        if key in self._watches or not isinstance(self._subscriptions.get(key, ()), tuple):
            return  # watched again meanwhile, or still being made (_subscribe then checks)
        await _unsubscribe_quietly(self._subscriptions.pop(key, ()))


async def _unsubscribe_quietly(subscriptions) -> None:
    for subscription in subscriptions:
        if subscription is None:
            continue
        try:
            await subscription.unsubscribe()
        except Exception:  # the connection is gone: so is the subscription
            pass


async def _close_quietly(nc) -> None:
    try:
        await asyncio.wait_for(nc.close(), 2.0)
    except Exception:  # closing must never raise
        pass


def _socket_of(nc) -> Optional[int]:
    """The file descriptor of a connected nats-py client's socket (None if it cannot be found)."""
    writer = getattr(getattr(nc, "_transport", None), "_io_writer", None)
    sock = writer.get_extra_info("socket") if writer is not None else None
    return sock.fileno() if sock is not None else None


class NatsOracle(LeaseOracle):
    """Leases in a NATS JetStream KV bucket (see the module docstring and
    :mod:`crown_sync.oracles._lease` for the safety argument). Needs nats-server 2.9 or newer
    with JetStream enabled (``nats-server -js``).

    server: ``"host:port"`` (port 4222 by default) of ONE NATS server.
    user, password: credentials (``authorization { users = [...] }`` on the server); ``user``
        alone is a token (``authorization { token: ... }``).
    bucket: the KV bucket (default ``crown_sync``), created if missing (file storage, history 1,
        ``max_age`` = ``bucket_max_age``); an existing bucket is used as it is, if its
        ``max_age`` is 0 (none) or at least ``2 * ttl + 2``.
    bucket_max_age: the max_age of a bucket this oracle creates (default a day): how long an
        abandoned record (a released election nobody runs any more) stays. Not the lease: a
        record that ages out only costs its next claimant a quarantine of one ``ttl``.
    ttl, margin, renew_interval, connect_timeout, timeout, clock: see
        :class:`~crown_sync.oracles._lease.LeaseOracle` (ttl default 10 s).
    poll_interval: how often a follower reads the key (default 1 s): a release is offered to one
        follower's process at once; the polls find crashed leaders, deletes and lost offers.
    key_prefix: prepended to the election name to make the key (default none: the bucket is ours).
    """

    def __init__(
        self,
        server: str = "127.0.0.1:4222",
        user: Optional[str] = None,
        password: Optional[str] = None,
        bucket: str = "crown_sync",
        ttl: float = 10.0,
        renew_interval: Optional[float] = None,
        poll_interval: float = 1.0,
        margin: Optional[float] = None,
        key_prefix: str = "",
        connect_timeout: Optional[float] = None,
        timeout: Optional[float] = None,
        bucket_max_age: float = 86400.0,
        clock: Callable[[], float] = time.time,
        tls: bool = False,
        tls_ca: Optional[str] = None,
        tls_cert: Optional[str] = None,
        tls_key: Optional[str] = None,
    ):
        self.host, self.port = _parse_server(server)
        self._tls = client_context(tls, tls_ca, tls_cert, tls_key, "a tls:// URL (or tls=True)")
        for option, value in (("user", user), ("password", password)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{option} must be a str, got {type(value).__name__}")
        if password is not None and not user:
            raise ValueError("password given without user")
        self._user, self._password = user or None, password
        if not isinstance(bucket, str) or not _BUCKET.match(bucket):
            raise ValueError(f"bucket must be 1 to 64 characters of A-Z a-z 0-9 _ -, got {bucket!r}")
        self.bucket = bucket
        self.stream = f"KV_{bucket}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._server = f"{'tls' if tls else 'nats'}://{host}:{self.port}"
        self.description = f"{self._server}?bucket={bucket}"  # never the credentials
        super().__init__(ttl, renew_interval, poll_interval, margin, key_prefix, connect_timeout, timeout, clock)
        self.bucket_max_age = seconds("bucket_max_age", bucket_max_age)
        if self.bucket_max_age < self.record_expire:
            raise ValueError(
                f"bucket_max_age ({self.bucket_max_age:g}) must be at least 2 * ttl + 2 ({self.record_expire} s): "
                f"a live leader's record must not age out between its renewals"
            )
        self._loop: Optional[_Loop] = None
        self._loop_lock = threading.Lock()
        self._stores: "weakref.WeakSet[_Store]" = weakref.WeakSet()
        self._closed = False

    @classmethod
    def from_url(cls, url: str) -> "NatsOracle":
        """``nats://[user:password@]host[:port][?bucket=..&ttl=..&renew_interval=..
        &poll_interval=..&margin=..&key_prefix=..&connect_timeout=..&timeout=..&bucket_max_age=..]``,
        or ``tls://`` for TLS (``&tls_ca=..&tls_cert=..&tls_key=..``)."""
        tls = url[:6].lower() == "tls://"
        host, port, user, password = one_server(
            url, "tls" if tls else "nats", 4222,
            "clustered JetStream is not supported here (see the NATS oracle's documentation)")
        return cls((host, port), user=user, password=password, tls=tls, **parse_options(url, _OPTIONS))

    def check_key(self, text: str, option: str) -> None:
        # A key is one or more subject tokens: no empty token (leading, trailing or double dots).
        empty_ok = option == "key_prefix"
        bad = not _KEY_CHARS.match(text) or text.startswith(".") or ".." in text or len(text) > 255
        if bad or (not empty_ok and (not text or text.endswith("."))):
            what = "key_prefix" if empty_ok else f"the key of this {option} ({text!r})"
            raise ValueError(
                f"{what} is not a NATS KV key: up to 255 characters of A-Z a-z 0-9 - / _ = . with no "
                f"dot at either end and no two dots in a row"
            )

    def heir_subject(self, key: str) -> str:
        return f"crown_sync.heir.{self.bucket}.{key}"

    # -- the lease machinery's hooks ----------------------------------------------------------

    def new_store(self) -> _Store:
        store = _Store(self)
        self._stores.add(store)
        return store

    def token_floor(self, store: LeaseStore) -> int:
        return store.token_floor()

    def term_token(self, store: LeaseStore, record: Optional[Dict[str, Any]]) -> int:
        # A record in the bucket was written in this bucket's lifetime (a recreated bucket starts
        # empty, and an empty key is claimed through a pending record that takes the floor), and
        # its token is at most the bucket's creation time plus its revision. So its token plus one
        # is above every earlier term's and at most the creation time plus the revision of the
        # write that replaces it: the floor would add nothing but a round trip to the handoff.
        token = record_token(record)
        return token + 1 if token > 0 else super().term_token(store, record)

    def watching(self, contender: LeaseContender, store: LeaseStore) -> None:
        # The shared connection joins each key's heir group once, for all its watchers.
        store.watch(self.key(contender.name), contender)

    def watching_again(self, contender: LeaseContender, store: LeaseStore) -> None:
        store.rejoin_heirs(self.key(contender.name))  # type: ignore[attr-defined]

    def released(self, store: LeaseStore, contender: LeaseContender) -> None:
        store.publish_heir(self.key(contender.name), contender)  # type: ignore[attr-defined]

    def unwatching(self, contender: LeaseContender) -> None:
        with self._lock:
            store = self._store
        if store is not None:
            store.unwatch(self.key(contender.name), contender)

    # -- the loop and connections --------------------------------------------------------------

    def _current_loop(self, make: bool = False) -> Optional[_Loop]:
        with self._loop_lock:
            loop = self._loop
            if loop is not None and loop.pid != os.getpid():
                loop = self._loop = None  # inherited across a fork without at-fork handlers (uWSGI)
            if loop is None and make:
                loop = self._loop = _Loop(f"crown-sync-nats:{self.bucket}")
            return loop

    async def _open(self, store: _Store):
        """A new connection for ``store`` and its bucket (created if missing)."""

        async def on_error(exc: Exception) -> None:
            # nats-py reports the server's asynchronous -ERR (a permissions violation) and failed
            # connection attempts here, and would print a traceback by default.
            store.last_error = redact_text(exc)
            logger.debug("NATS at %s: %s", self.description, store.last_error)

        options = dict(
            # Two attempts, then NoServersError (0 would mean: try for ever).
            servers=[self._server], connect_timeout=self.connect_timeout, allow_reconnect=False,
            max_reconnect_attempts=1, reconnect_time_wait=0.1, error_cb=on_error, name="crown_sync",
            # A server that stops answering (paused, cut off) is dropped after two missed pings.
            ping_interval=max(1.0, self.renew_interval), max_outstanding_pings=2,
        )
        if self._tls is not None:
            options.update(tls=self._tls)
        if self._password is not None:
            options.update(user=self._user, password=self._password)
        elif self._user:
            options.update(token=self._user)
        nc = await nats.connect(**options)
        try:
            return nc, await self._bucket(nc.jetstream(timeout=self.timeout))
        except BaseException:
            await _close_quietly(nc)
            raise

    async def _bucket(self, js):
        try:
            kv = await js.key_value(self.bucket)
        except nats.js.errors.BucketNotFoundError:
            config = KeyValueConfig(bucket=self.bucket, history=1, ttl=self.bucket_max_age, storage=StorageType.FILE)
            try:
                return await js.create_key_value(config)
            except nats.js.errors.BadRequestError:  # made by someone else meanwhile
                kv = await js.key_value(self.bucket)
        max_age = (await js.stream_info(self.stream)).config.max_age or 0
        if 0 < max_age < self.record_expire:
            raise NatsError(
                f"NATS at {self.description}: bucket {self.bucket!r} has max_age {max_age:g} s, below "
                f"2 * ttl + 2 ({self.record_expire} s): a leader's record could age out between renewals; "
                f"use another bucket or recreate this one with a longer max_age"
            )
        return kv

    def _error(self, what: str, exc: BaseException, last_error: Optional[str]) -> NatsError:
        text = redact_text(exc) or type(exc).__name__
        if isinstance(exc, nats.errors.NoServersError):
            text = "could not connect (is nats-server running there?)"
        elif "authorization violation" in text.lower():
            text = "authorization violation: wrong user, password or token"
        elif isinstance(exc, (asyncio.TimeoutError, nats.errors.TimeoutError)):
            text = f"no answer within {self.timeout:g} s"
        elif isinstance(exc, (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError)):
            text = "no JetStream answered (is nats-server started with -js? was the bucket deleted?)"
        if last_error and last_error not in text:
            text += f" (last error: {last_error})"
        return NatsError(f"NATS at {self.description}: {what} failed: {text}")

    def _store_closed(self, store: _Store) -> None:
        self._stores.discard(store)
        if self._closed and not self._stores:
            self._stop_loop()

    def _stop_loop(self) -> None:
        with self._loop_lock:
            loop, self._loop = self._loop, None
        if loop is not None and loop.pid == os.getpid():
            loop.stop()

    def close(self) -> None:
        self._closed = True
        super().close()
        if not self._stores:
            self._stop_loop()

    def _after_fork_in_child(self) -> None:
        super()._after_fork_in_child()
        for store in list(self._stores):
            store.after_fork_in_child()
        self._stores = weakref.WeakSet()
        self._loop = None  # the parent's (its thread did not cross the fork): a new one on demand
        self._loop_lock = threading.Lock()


def _parse_server(server: Any) -> Tuple[str, int]:
    if isinstance(server, str):
        host, port, user, _ = one_server(f"nats://{server.strip()}", "nats", 4222, "give one server")
        if user is not None:
            raise ValueError("server takes no user or password: pass user= and password=")
        return host, port
    if not (isinstance(server, tuple) and len(server) == 2):
        raise TypeError(f"server must be 'host:port' or (host, port), got {type(server).__name__}")
    host, port = server
    if not isinstance(host, str) or not host:
        raise ValueError(f"server host must be a non-empty string, got {host!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"server port must be an integer in 1..65535, got {port!r}")
    return host, port
