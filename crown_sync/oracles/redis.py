"""Redis oracle: a lease record in one key, created with ``SET NX``, replaced only by a Lua
compare-and-set, with releases and dismissals pushed to the followers over pub/sub.

For apps whose shared service is Redis (Celery's broker, a cache). One key per election,
``<key_prefix><name>``, holds the JSON lease record of :mod:`crown_sync.oracles._lease`, which
carries the safety argument: this module only says how to read, create and replace that key on
Redis, where the fencing tokens come from, and how followers hear of a release at once.

Why not the issue's first sketch (the key's own ``PX`` expiry as the lease, released by a
compare-and-delete): a key deleted by an administrator, a ``FLUSHALL``, an eviction under
``maxmemory``, or a restart without persistence all leave the key absent, exactly as a clean
release would, while the old leader's child may still run. So the holder's release is a
``released`` record written by compare-and-set (never a delete, blind or not), and an absent key
means "unknown": the claimant holds a ``pending`` record for one ``ttl`` before it starts (the
quarantine of ``_lease``). The key's expiry (``2 * ttl + 2`` s for a ``held`` record, a day for
the others) only collects abandoned records; the lease is timed on the contenders' own clocks.

The primitives: ``read`` is a script returning ``GET`` of the key (the version is the value
itself: every record carries a fresh write id, so the same bytes never come back); ``create`` is
``SET key value NX EX s``; ``replace`` is one Lua script that compares the stored value with the
version and only then ``SET``\\ s the new one, atomically on the server. Every replace also stamps
the key with the server's ``run_id`` (new at each start of redis-server) in the hash
``<key_prefix>:server``; a ``released`` record that the running server did not write (it came
back from an RDB snapshot or an append-only file older than what the contenders saw: a successor
may have taken it over since) reads as ``vacated``, so it is taken over only once stale.

Fencing tokens: ``max(previous token + 1, INCR <key_prefix>:token)``, in the script that writes
the term's record. The counter is one key per
``key_prefix`` (shared by the elections under it: tokens need only rise per election). On a
server ``run_id`` it has not been checked on (first use, any restart, a promoted replica), the
same script first lifts it to the server's ``TIME`` in microseconds if lower. So tokens rise by
one per term within a run of the server with no assumption at all, and across a restart, a
``FLUSHALL`` or a snapshot older than the last tokens, as long as the server's wall clock did not
step back (earlier tokens are an earlier lift plus one per claim). docs/oracles/redis.rst argues
this against refusing a server without persistence.

Push: every contender is registered with its oracle's one pub/sub connection (a daemon thread,
its own socket), subscribed to the channel ``<key_prefix><name>``. A holder that releases or
vacates its record, and ``dismiss``, ``PUBLISH`` to it in the script of that write, with the new
record (a release goes to one heir process only, see Herds): a watching follower takes a release
over by one script (the compare-and-set over the pushed bytes, the token taken inside it), and a
dismissed leader refreshes at once. The holder
renews and releases by a compare-and-set over its own last write, without reading first, so a
graceful handoff is one write on each side. Pub/sub is not durable (a message sent while the
subscriber reconnects is lost), so followers still poll every ``poll_interval`` (default 1 s: the
requests at rest are one read per second per follower, and one compare-and-set per
``renew_interval`` for the leader), and a (re)subscription makes every follower read at once.

Refused at connection time, with an error naming the problem (shown in ``status().last_error``):
a Redis Cluster node (``cluster_enabled:1``), a replica (``ROLE`` is ``slave``: writes would fail,
and a lease on it would mean nothing) and a Sentinel (``ROLE`` is ``sentinel``). ``redis+sentinel``
URLs are refused at construction: Sentinel failover is not tested here (see the docs for what an
asynchronous replica's promotion does to a lease).

Connections: one per oracle object for every contender's commands (a pool of one connection, the
calls take turns) and its pub/sub connection. Herds: a release is offered to one following
process, the heir (see ``_Push``), which alone wakes. Without one, it is broadcast, saying how many
processes listen; each draws its turn to try the takeover among that many (see ``_turn``); the
takeover script publishes the new record, and a process whose turn comes after it does not try.

Fork safety: sockets are opened under :func:`crown_sync._forksafe.opening` and blinded in a forked
child; redis-py itself never shuts down a socket from a process other than its creator.
"""

import json
import logging
import random
import re
import secrets
import threading
import time
import urllib.parse
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

import tenacity

from .. import _forksafe
from ..urls import one_server, parse_options, redact_text
from ._base import Phase
from ._lease import RELEASED, URL_OPTIONS, VACATED, LeaseContender, LeaseOracle, LeaseStore, decode, record_token

try:  # the client library is an extra: a missing one is reported by crown_sync.urls
    import redis
    import redis.exceptions
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError:  # pragma: no cover - see crown_sync.urls.missing_library
    raise

__all__ = ["RedisOracle", "RedisOracleError", "RedisRefused"]

logger = logging.getLogger("crown_sync.oracles.redis")

# The lease's options (as every lease oracle's), then TLS's.
_OPTIONS: Dict[str, Any] = dict(URL_OPTIONS, ssl_ca_certs=str, ssl_cert_reqs=str, ssl_check_hostname=bool)
_CERT_REQS = ("required", "optional", "none")

# Which server incarnation holds our keys: run_id is new at every start of redis-server (and
# another on a promoted replica). The hash <key_prefix>:server remembers, per lease key, the
# run_id of the server that ran the last compare-and-set of it, and the run_id the token counter
# was last checked on.
_RUN = "local run = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)')\n"

# KEYS[1]: the lease key, KEYS[2]: the server hash. The value, and 1 if this incarnation of the
# server wrote it (0: it came from before a restart, or from a snapshot; see RedisStore.read).
_READ = _RUN + """
return {redis.call('GET', KEYS[1]), redis.call('HGET', KEYS[2], KEYS[1]) == run and 1 or 0}
"""

# listeners: how many connections listen on a channel (false if the ACL denies PUBSUB).
_LISTENERS = """
local function listeners(channel)
  local listening = redis.pcall('PUBSUB', 'NUMSUB', channel)
  return type(listening) == 'table' and tonumber(listening[2])
end
"""

# Lua shared by the scripts that publish a release. broadcast: to the election's channel, that
# is to every process with a crown of it; a release's news also says how many connections listen
# there (the followers' processes, and ours): each draws its turn among that many (_Push._deliver).
# offer: to ONE process following the election, its heir, on that process's own channel; the
# heirs are the set KEYS[3] (each process adds its channel when it subscribes: see _Push), and the
# sampled members nobody listens on any more (their process is gone) are dropped. False: nobody
# to offer it to (or an ACL without SRANDMEMBER or PUBSUB): broadcast it instead. pcall: an ACL
# that denies a command costs the herd saving, never the release (an error after the write
# would fail the script with the write done).
_PUBLISH = _LISTENERS + """
local function broadcast(channel, news, value)
  if news == 'released' then
    local count = listeners(channel)
    if count then news = news .. ' ' .. count end
  end
  redis.call('PUBLISH', channel, news .. '\\n' .. value)
end
local function offer(heirs, releaser, value)
  local candidates = redis.pcall('SRANDMEMBER', heirs, 8)
  if type(candidates) ~= 'table' or candidates.err then return false end
  local offered = false
  for _, heir in ipairs(candidates) do
    if heir ~= releaser then
      local count = listeners(heir)
      if not count then return offered end
      if count == 0 then
        redis.pcall('SREM', heirs, heir)
      elseif not offered then
        offered = type(redis.pcall('PUBLISH', heir, 'released\\n' .. value)) == 'number'
      end
    end
  end
  return offered
end
"""

# KEYS[1]: the lease key, KEYS[2]: the server hash, KEYS[3]: the election's heirs. ARGV: the
# version (value) we read, the new value, seconds to live, what to publish (nothing if empty),
# '1' if the version must have been written by this incarnation of the server (a pushed release:
# see _Pushed), and the releasing process's own heir channel (not offered the release back). The
# publish is in the same step as the write, so a follower woken by it always finds the new
# record. A release is offered to one heir if there is one (see _PUBLISH), else broadcast.
# 1: replaced; 0: the key holds something else now (or an older incarnation wrote it); -1: absent.
_REPLACE = _RUN + _PUBLISH + """
local current = redis.call('GET', KEYS[1])
if not current then return -1 end
if current ~= ARGV[1] then return 0 end
if ARGV[5] == '1' and redis.call('HGET', KEYS[2], KEYS[1]) ~= run then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
redis.call('HSET', KEYS[2], KEYS[1], run)
if ARGV[4] == 'released' and offer(KEYS[3], ARGV[6], ARGV[2]) then return 1 end
if ARGV[4] ~= '' then broadcast(KEYS[1], ARGV[4], ARGV[2]) end
return 1
"""

# An heir that no crown of its process follows any more passes the release on to every follower
# (as if no heir had been found), if it is still the key's record. KEYS[1]: the lease key; ARGV[1]:
# the release's bytes.
_BROADCAST = _PUBLISH + """
if redis.call('GET', KEYS[1]) == ARGV[1] then broadcast(KEYS[1], 'released', ARGV[1]) return 1 end
return 0
"""

# A process follows elections: each heir channel ARGV[i + 1] joins its election's heirs KEYS[i],
# which a day without any registration collects (a process registers again every HEIR_REFRESH
# seconds); a sample of each set's members nobody listens on any more is dropped on the way (a
# process that died leaves its channel behind: each registration clears about as many as
# restarts leave). ARGV[1]: seconds the sets live.
_REGISTER = _LISTENERS + """
for i, heirs in ipairs(KEYS) do
  redis.call('SADD', heirs, ARGV[i + 1])
  redis.call('EXPIRE', heirs, ARGV[1])
  local sample = redis.pcall('SRANDMEMBER', heirs, 8)
  if type(sample) == 'table' and not sample.err then
    for _, heir in ipairs(sample) do
      if listeners(heir) == 0 then redis.pcall('SREM', heirs, heir) end
    end
  end
end
"""

# A process no longer follows these elections: its heir channels ARGV[i] leave the heirs KEYS[i].
_UNREGISTER = """
for i, heirs in ipairs(KEYS) do redis.pcall('SREM', heirs, ARGV[i]) end
"""

# The local counter: the token counter; KEYS[2]: the server hash. On a server incarnation not seen
# before (a restart, with or without its data, or from an older snapshot; a promoted replica), the
# counter first rises to the server's clock in microseconds: above every token taken before, as
# long as that clock did not step back, even when the counter came back older or not at all.
_LIFT = """
if redis.call('HGET', KEYS[2], 'token_run') ~= run then
  local now = redis.call('TIME')
  local clock = now[1] .. string.format('%06d', tonumber(now[2]))
  if tonumber(redis.call('GET', counter) or '0') < tonumber(clock) then
    redis.call('SET', counter, clock)
  end
  redis.call('HSET', KEYS[2], 'token_run', run)
end
"""

# KEYS[1]: the token counter, KEYS[2]: the server hash.
_NEXT_TOKEN = _RUN + "local counter = KEYS[1]\n" + _LIFT + "return redis.call('INCR', counter)\n"

# A term's start in one step (RedisOracle.start_term). KEYS[1]: the lease key, KEYS[2]: the server
# hash, KEYS[3]: the token counter. ARGV: the version (value) read, the new record's bytes before
# and after its token, the least token (the replaced record's plus one), seconds to live, '1'
# if the version must have been written by this incarnation (see _Pushed), and '1' if the release
# was offered to this process alone (see _Offered: the others did not hear of it, so the new term
# is not pushed to them; their next poll reads it). The token is the
# larger of that and the counter's INCR, as RedisOracle.token_floor would give in a round trip
# of its own. Returns the token; 0: the key holds something else; -1: it is absent.
_START_TERM = _RUN + """
local current = redis.call('GET', KEYS[1])
if not current then return -1 end
if current ~= ARGV[1] then return 0 end
if ARGV[6] == '1' and redis.call('HGET', KEYS[2], KEYS[1]) ~= run then return 0 end
local counter = KEYS[3]
""" + _LIFT + """
local token = math.max(redis.call('INCR', counter), tonumber(ARGV[4]))
local value = ARGV[2] .. string.format('%d', token) .. ARGV[3]
redis.call('SET', KEYS[1], value, 'EX', ARGV[5])
redis.call('HSET', KEYS[2], KEYS[1], run)
if ARGV[7] ~= '1' then redis.call('PUBLISH', KEYS[1], 'held\\n' .. value) end
return token
"""

_SCRIPTS: Dict[str, str] = {"read": _READ, "replace": _REPLACE, "next_token": _NEXT_TOKEN, "start_term": _START_TERM,
                             "broadcast": _BROADCAST, "register": _REGISTER, "unregister": _UNREGISTER}

#: Seconds a set of heirs lives after its last registration, and between a process's registrations.
HEIRS_EXPIRE = 86400
HEIR_REFRESH = 3600

# Stands for the token in a record built before the script knows it: random, so that no leader
# metadata can hold it too.
_TOKEN_MARK = "crown-sync-token-" + secrets.token_hex(16)


class RedisOracleError(ConnectionError):
    """Redis could not be reached or answered an error (the message names the server, never a
    password)."""


class RedisRefused(RedisOracleError):
    """The server is not a single Redis primary (a Cluster node, a replica, a Sentinel), or it
    refused our credentials."""


class _Pushed(bytes):
    """A version (the value itself) that came in a pub/sub message, not from a read: a compare-
    and-set over it also requires that the running server wrote it. A read shows a release from an
    older incarnation (a snapshot brought it back) as vacated; a message published before such a
    restart and handled after it must not count as a release either."""


class _Offered(_Pushed):
    """A release offered to this process alone, as the election's heir: its takeover is not
    pushed to the other followers, who never heard of the release."""


class _Refused(redis.exceptions.ConnectionError):
    """Raised while connecting, so that redis-py drops the connection; becomes RedisRefused."""


def _check_server(connection: "redis.connection.Connection") -> None:
    """Run at every (re)connection, after AUTH/SELECT: a single primary, or refuse it."""
    connection.on_connect()
    connection.send_packed_command(connection.pack_commands([("ROLE",), ("INFO", "cluster")]))
    role = connection.read_response()
    cluster = connection.read_response()
    role = role[0] if isinstance(role, (list, tuple)) and role else role
    role = role.decode() if isinstance(role, bytes) else str(role)
    cluster = cluster.decode() if isinstance(cluster, bytes) else str(cluster)
    if "cluster_enabled:1" in cluster:
        raise _Refused(
            "the server is a Redis Cluster node (cluster_enabled:1): a lease needs ONE Redis "
            "server, and Cluster's failover to an asynchronous replica can lose it; give the "
            "election a single Redis server"
        )
    if role == "slave":
        raise _Refused("the server is a read-only replica (ROLE slave): point the URL at the primary")
    if role == "sentinel":
        raise _Refused("the server is a Redis Sentinel, not a Redis server: point the URL at the primary")


def _fork_safe(base: type) -> type:
    class ForkSafe(base):  # type: ignore[misc, valid-type]
        def _connect(self):
            # Recorded before a fork can copy it: blinded in a forked child (crown_sync._forksafe).
            with _forksafe.opening() as keep:
                sock = super()._connect()
                keep(sock)
            return sock

    ForkSafe.__name__ = f"ForkSafe{base.__name__}"
    return ForkSafe


_ForkSafeConnection = _fork_safe(redis.connection.Connection)
_ForkSafeSSLConnection = _fork_safe(redis.connection.SSLConnection)


def _explain(exc: BaseException, has_password: bool) -> str:
    denied = isinstance(exc, redis.exceptions.AuthenticationError) or "NOAUTH" in str(exc)
    if denied and not has_password:
        return "the server requires a password: give it in the URL (redis://[user]:PASSWORD@host)"
    if denied or "WRONGPASS" in str(exc):
        return "authentication failed: wrong user or password (the password is not shown)"
    if "NOPERM" in str(exc):
        return redact_text(f"the user may not run a command the oracle needs (GET, SET, EVALSHA, PUBLISH, ...): {exc}")
    return redact_text(f"{type(exc).__name__}: {exc}")


def _shown(value: Optional[bytes], current: Any) -> Tuple[Optional[bytes], Any]:
    """(value, version) of a read script's answer: the value and whether this incarnation of the
    server wrote it."""
    if value is not None and not current:
        record = decode(value)
        if record is not None and record.get("state") == RELEASED:
            # Written before the server (re)started: a restart from an older snapshot (RDB, or
            # an append-only file not yet fsynced) can bring back a release whose taker still
            # leads. Shown as vacated: taken over only once unchanged for a ttl (stale).
            record.update(state=VACATED, prev_state=RELEASED, by="restart")
            return json.dumps(record, sort_keys=True).encode(), value
    return value, value


class RedisStore(LeaseStore):
    """The oracle's one connection for its contenders' calls (a redis-py client on a pool of ONE
    connection: calls take turns, each waiting at most ``timeout`` for it)."""

    def __init__(self, oracle: "RedisOracle"):
        self._oracle = oracle
        self._client: Optional["redis.Redis"] = None
        self._scripts: Dict[str, Any] = {}
        self._making = threading.Lock()
        self._turn = threading.Lock()

    def _redis(self) -> "redis.Redis":
        with self._making:
            if self._client is None:
                client = self._oracle.new_client(shared=True)
                self._scripts = {name: client.register_script(source) for name, source in _SCRIPTS.items()}
                self._client = client
            return self._client

    def _run(self, what: str, call: Callable[["redis.Redis"], Any], retry_read: bool = False) -> Any:
        try:
            # The calls take turns on the one connection (a plain lock: redis-py's blocking pool
            # costs several times more per call with hundreds of threads waiting).
            if not self._turn.acquire(timeout=self._oracle.timeout):
                raise redis.exceptions.TimeoutError(f"the connection stayed busy for {self._oracle.timeout:g} s")
            try:
                return self._call(call, retry_read)
            finally:
                self._turn.release()
        except _Refused as exc:
            raise RedisRefused(f"redis at {self._oracle.description}: {exc}") from None
        except (redis.exceptions.RedisError, OSError) as exc:
            error = RedisRefused if isinstance(exc, redis.exceptions.AuthenticationError) else RedisOracleError
            why = _explain(exc, self._oracle.has_password)
            raise error(f"redis at {self._oracle.description}: {what} failed: {why}") from None

    def _call(self, call: Callable[["redis.Redis"], Any], retry_read: bool) -> Any:
        if retry_read:
            # A read on a connection the server closed meanwhile (it restarted) is retried
            # once on a fresh one: harmless for a read, unlike a write whose fate is unknown.
            retrying = tenacity.Retrying(
                stop=tenacity.stop_after_attempt(2),
                retry=tenacity.retry_if_exception_type(redis.exceptions.ConnectionError)
                & tenacity.retry_if_not_exception_type(_Refused),
                reraise=True,
            )
            return retrying(call, self._redis())
        return call(self._redis())

    def read(self, key: str) -> Tuple[Optional[bytes], Any]:
        value, current = self._run(
            "read script",
            lambda client: self._scripts["read"](keys=[key, self._oracle.server_key], client=client),
            retry_read=True,
        )
        return _shown(value, current)

    def read_many(self, keys: List[str]) -> Dict[str, Tuple[Optional[bytes], Any]]:
        if len(keys) == 1:
            return {keys[0]: self.read(keys[0])}

        def reads(client: "redis.Redis") -> List[Any]:
            script = self._scripts["read"]
            # One round trip for every key. EVALSHA itself: redis-py's pipelined scripts would
            # send a SCRIPT EXISTS first, every time; a server that lost the script says so and
            # the script is loaded for the retry.
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.evalsha(script.sha, 2, key, self._oracle.server_key)
            try:
                return pipe.execute()
            except redis.exceptions.NoScriptError:
                client.script_load(script.script)
                raise redis.exceptions.ConnectionError("the read script was not loaded: read again")

        answers = self._run("read scripts", reads, retry_read=True)
        return {key: _shown(value, current) for key, (value, current) in zip(keys, answers)}

    def create(self, key: str, value: bytes, expire: int) -> bool:
        return bool(self._run("SET NX", lambda client: client.set(key, value, nx=True, ex=int(expire))))

    def replace(self, key: str, value: bytes, version: Any, expire: int) -> Optional[bool]:
        record = decode(value)
        # A release, a dismissal or a vacating close is pushed to the followers (and a dismissal to
        # its leader); a renewal is not: nobody waits for those. (A takeover is, by _START_TERM:
        # followers waiting their turn for the release it took drop their attempts.)
        news = record.get("by") or record["state"] if record and record["state"] in (RELEASED, VACATED) else ""
        fresh = "1" if isinstance(version, _Pushed) else ""
        keys = [key, self._oracle.server_key, self._oracle.heirs_key(key)]
        releaser = self._oracle.releasing_heir(key) if news == RELEASED else ""
        done = self._run(
            "compare-and-set script",
            lambda client: self._scripts["replace"](
                keys=keys, args=[version, value, int(expire), news, fresh, releaser], client=client),
        )
        return None if done == -1 else bool(done)

    def register_heirs(self, channels: Dict[str, str], joining: bool = True) -> None:
        """Each ``channels[key]`` (this process's) joins (or leaves) the heirs of ``key``'s
        releases, in one script."""
        keys = [self._oracle.heirs_key(key) for key in channels]
        args = ([HEIRS_EXPIRE] if joining else []) + list(channels.values())
        name = "register" if joining else "unregister"  # the scripts are made with the client
        self._run("heir registration script", lambda client: self._scripts[name](keys=keys, args=args, client=client))

    def broadcast_release(self, key: str, value: bytes) -> None:
        """Push the release ``value`` of ``key`` to every follower, if it is still the record."""
        self._run("release broadcast script", lambda client: self._scripts["broadcast"](
            keys=[key], args=[value], client=client))

    def written_version(self, value: bytes) -> Any:
        return value  # the compare-and-set compares the bytes themselves

    def start_term(self, key: str, version: Any, build: Callable[[Any], bytes], least: int,
                   expire: int) -> Optional[Tuple[int, bytes]]:
        """The token and the compare-and-set of a new term's record in one script (_START_TERM)."""
        mark = json.dumps(_TOKEN_MARK).encode()
        before, found, after = build(_TOKEN_MARK).partition(mark)
        if not found or mark in after:
            raise ValueError("a term's record must hold its token exactly once")  # never: the mark is ours
        fresh = "1" if isinstance(version, _Pushed) else ""
        offered = "1" if isinstance(version, _Offered) else ""
        keys = [key, self._oracle.server_key, self._oracle.key_prefix + ":token"]
        token = self._run(
            "term start script",
            lambda client: self._scripts["start_term"](
                keys=keys, args=[version, before, after, least, int(expire), fresh, offered], client=client),
        )
        return (token, before + str(token).encode() + after) if token > 0 else None

    def entries(self, prefix: str) -> Dict[str, Optional[bytes]]:
        # SCAN's MATCH is a glob: the prefix's own * ? [ ] and backslash must match only themselves.
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*"

        def listing(client: "redis.Redis") -> Dict[str, Optional[bytes]]:
            keys = sorted(set(client.scan_iter(match=pattern, count=1000)))  # SCAN may repeat a key
            names = [key.decode("utf-8", "replace") for key in keys]
            return dict(zip(names, client.mget(keys))) if keys else {}  # MGET: nil for a hash

        return self._run("SCAN and MGET", listing, retry_read=True)

    def next_token(self) -> int:
        keys = [self._oracle.key_prefix + ":token", self._oracle.server_key]
        return int(self._run("token script", lambda client: self._scripts["next_token"](keys=keys, client=client)))

    def interrupt(self) -> None:
        client = self._client
        if client is not None:
            client.connection_pool.disconnect(inuse_connections=True)  # shuts the socket down

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.connection_pool.disconnect(inuse_connections=True)


#: Seconds between two turns at a pushed release: more than a takeover's script and its push
#: take on a quiet network, so that a process whose turn comes later has usually heard of it.
TURN_STEP = 0.005


def _turn(listeners: bytes) -> float:
    """When this process tries to take a pushed release over: one of as many turns as there are
    other listeners (followers' processes), drawn at random, so that a handoff costs about one
    attempt (the first turn taken; later ones see its takeover first), not one per follower.
    One or two followers both try at once, as before: two attempts at most, and no wait."""
    try:
        others = int(listeners) - 1  # the releasing leader's process listens too
    except ValueError:
        return 0.0  # no count (an older crown_sync released): at once, as before
    return random.randrange(others) * TURN_STEP if others > 2 else 0.0


class _Push:
    """The oracle's one pub/sub connection, in a daemon thread that alone touches it.

    Contenders are registered at creation (no I/O); the thread subscribes to their channels within
    a ``_TICK`` and drops channels whose contenders are all closed. A message, or a confirmation
    of a (re)subscription, makes each follower of the channel read at once (``nudge``) and, for a
    dismissal, makes its leader refresh at once.

    Heirs: for each election it follows, the process also listens on a channel of its own,
    ``<key> <process nonce>`` (a space: no election name holds one), and adds it to the election's
    heirs once subscribed (all the keys confirmed meanwhile in one script, at the next quiet
    moment or tick). A release is offered on one heir's channel (see _PUBLISH): its process alone
    wakes, and one of its watching crowns takes it over at once. An heir whose crowns all stopped
    watching broadcasts the release, as if it had no heir. A server that refuses our heir
    channels (an ACL naming channels exactly) gets none: every release is then broadcast.
    """

    _TICK = 0.2  # seconds between looks at the registrations (no request: a socket wait)
    _RETRY = 5.0  # seconds before a failed (un)registration is tried again

    def __init__(self, oracle: "RedisOracle"):
        self._oracle = oracle
        self._lock = threading.Lock()
        self._members: Dict[str, "weakref.WeakSet[LeaseContender]"] = {}
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self._nonce = secrets.token_hex(8)  # a new _Push (and nonce) in a forked child
        self._heirs = True  # False once the server refused our heir channels
        # The pub/sub thread's own: key -> when its heir channel was last registered, and the
        # keys whose heir channel to register (confirmed) or unregister (left), and when next.
        self._registered: Dict[str, float] = {}
        self._confirmed: set = set()
        self._left: set = set()
        self._due = 0.0

    def heir_channel(self, key: str) -> str:
        return f"{key} {self._nonce}"

    def releasing_heir(self, key: str) -> str:
        """This process's heir channel of ``key`` if no crown here watches it ('' if one does): a
        release written here is offered to another process."""
        with self._lock:
            members = list(self._members.get(key, ()))
        return "" if any(contender.watching for contender in members) else self.heir_channel(key)

    def add(self, channel: str, contender: LeaseContender) -> None:
        with self._lock:
            self._members.setdefault(channel, weakref.WeakSet()).add(contender)
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="crown-sync-redis-push", daemon=True)
                self._thread.start()

    def _wanted(self) -> set:
        with self._lock:
            for channel, members in list(self._members.items()):
                if not any(contender.usable for contender in members):
                    del self._members[channel]
            return set(self._members)

    def _run(self) -> None:
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(Exception),
            wait=tenacity.wait_exponential(multiplier=0.05, max=self._oracle.poll_interval),
            before_sleep=lambda state: logger.debug(
                "pub/sub on %s failed, reconnecting: %s", self._oracle.description, state.outcome.exception()
            ),
        )
        try:
            retrying(self._listen)
        except tenacity.RetryError:  # pragma: no cover - never stops retrying
            pass

    def _listen(self) -> None:
        """One pub/sub session: returns when closed, raises on a connection error."""
        subscribed: set = set()
        self._registered.clear()  # registered again once subscribed again
        self._confirmed.clear()
        pubsub = self._oracle.new_client().pubsub()
        look = 0.0
        try:
            while not self._closed:
                if time.monotonic() >= look:  # once a tick, not per message: 1,000 keys cost
                    subscribed = self._resubscribe(pubsub, subscribed)  # seconds a look
                    look = time.monotonic() + self._TICK
                    self._register(subscribed)
                if not subscribed:
                    time.sleep(self._TICK)
                    continue
                message = pubsub.get_message(timeout=self._TICK)
                if message is not None:
                    self._deliver(message)
                else:
                    self._register(subscribed)  # a quiet moment: the confirmed keys at once
        except redis.exceptions.NoPermissionError as exc:
            if self._heirs:
                self._heirs = False
                logger.warning("%s: the user may not subscribe to the crowns' own channels (%s): every "
                               "release is pushed to all followers (see Sharing a server)",
                               self._oracle.description, exc)
            raise  # the next session subscribes to the elections' channels only
        finally:
            pubsub.close()

    def _resubscribe(self, pubsub: Any, subscribed: set) -> set:
        wanted = self._wanted()
        new, gone = wanted - subscribed, subscribed - wanted
        if new:
            pubsub.subscribe(*new)
            if self._heirs:  # a command of their own: a refusal leaves the elections' channels
                pubsub.subscribe(*(self.heir_channel(key) for key in new))
        if gone:
            pubsub.unsubscribe(*gone, *((self.heir_channel(key) for key in gone) if self._heirs else ()))
            self._confirmed -= gone
            self._left |= {key for key in gone if self._registered.pop(key, None) is not None}
        return wanted

    def _register(self, subscribed: set) -> None:
        """(Un)register the heir channels due, each way in one script (failures: again later)."""
        now = time.monotonic()
        if now < self._due:
            return
        stale = now - HEIR_REFRESH
        joining = (self._confirmed | {key for key, when in self._registered.items() if when < stale}) & subscribed
        for keys, join in ((joining, True), (set(self._left), False)):
            if not keys or self._closed:
                continue
            try:
                self._oracle._shared("register_heirs", {key: self.heir_channel(key) for key in keys}, join)
            except Exception as exc:  # releases are broadcast meanwhile: slower with many followers, as safe
                logger.debug("%s: heir registration failed: %s", self._oracle.description, exc)
                self._due = now + self._RETRY
                return
            if join:
                self._confirmed -= keys
                self._registered.update(dict.fromkeys(keys, now))
            else:
                self._left -= keys

    def _deliver(self, message: Dict[str, Any]) -> None:
        kind = message.get("type")
        if kind not in ("message", "subscribe"):
            return
        channel = message.get("channel")
        channel = channel.decode() if isinstance(channel, bytes) else str(channel)
        data = message.get("data") if kind == "message" else None
        news, _, value = data.partition(b"\n") if isinstance(data, bytes) else (b"", b"", b"")
        key, _, nonce = channel.partition(" ")
        if nonce:
            if kind == "subscribe":
                self._confirmed.add(key)
            elif news == b"released" and value:
                self._inherit(key, value)
            return
        news, _, listeners = news.partition(b" ")
        # The new record came with the news: a follower takes a release over without reading it.
        pushed = (value, _Pushed(value)) if value else None
        with self._lock:
            members = list(self._members.get(channel, ()))
        turn = _turn(listeners)
        for contender in members:
            if contender.phase is Phase.LEADING:
                if news == b"dismiss":
                    contender._notify()  # a refresh is due now: it finds the vacated record
            else:
                contender.nudge(pushed, turn)

    def _inherit(self, key: str, value: bytes) -> None:
        """This process is the heir of a release: one of its watching crowns takes it over now."""
        with self._lock:
            members = list(self._members.get(key, ()))
        random.shuffle(members)
        if any(contender.nudge((value, _Offered(value))) for contender in members) or self._closed:
            return
        try:
            self._oracle._shared("broadcast_release", key, value)
        except Exception as exc:  # the followers' polls find it
            logger.debug("%s: could not pass the release of %s on: %s", self._oracle.description, key, exc)

    def close(self) -> None:
        self._closed = True
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(self._TICK * 2 + self._oracle.timeout)


class RedisOracle(LeaseOracle):
    """Leases on ONE Redis server (see the module docstring, and ``_lease`` for the argument).

    host, port, db: the server and database number.
    username, password: credentials (an ACL user, or only a password for the default user).
    tls: connect with TLS (``rediss://``); ``ssl_ca_certs`` (a CA bundle file),
        ``ssl_cert_reqs`` (``required``, ``optional`` or ``none``) and ``ssl_check_hostname``.
    ttl: lease length in seconds (>= 1, default 10). Crash failover takes about
        ``ttl + poll_interval``; after the key was lost, the first claimant waits one ``ttl``.
    poll_interval: how often a follower reads the key (default 1 s). Releases and dismissals
        are pushed over pub/sub (a release to one heir process): this poll finds crashed leaders,
        lost messages, and the new term for the followers that were not the heir.
    margin, renew_interval, connect_timeout, timeout, clock: as for every lease oracle
        (:class:`crown_sync.oracles._lease.LeaseOracle`).
    key_prefix: prepended to the election name to make the key and the channel (default
        ``"crown_sync:"``); the token counter is ``<key_prefix>:token``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 6379,
        db: int = 0,
        username: Optional[str] = None,
        password: Optional[str] = None,
        tls: bool = False,
        ssl_ca_certs: Optional[str] = None,
        ssl_cert_reqs: str = "required",
        ssl_check_hostname: bool = False,
        ttl: float = 10.0,
        renew_interval: Optional[float] = None,
        poll_interval: float = 1.0,
        margin: Optional[float] = None,
        key_prefix: str = "crown_sync:",
        connect_timeout: Optional[float] = None,
        timeout: Optional[float] = None,
        clock: Callable[[], float] = time.time,
    ):
        if not isinstance(host, str) or not host or "," in host:
            raise ValueError(f"host must be ONE Redis server's host name or address, got {host!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"port must be an integer in 1..65535, got {port!r}")
        if isinstance(db, bool) or not isinstance(db, int) or db < 0:
            raise ValueError(f"db must be a database number >= 0, got {db!r}")
        for option, value in (("username", username), ("password", password), ("ssl_ca_certs", ssl_ca_certs)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{option} must be a str, got {type(value).__name__}")
        if ssl_cert_reqs not in _CERT_REQS:
            raise ValueError(f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}, got {ssl_cert_reqs!r}")
        if not tls and (ssl_ca_certs is not None or ssl_check_hostname):
            raise ValueError("ssl_ca_certs and ssl_check_hostname need TLS: use a rediss:// URL (tls=True)")
        self.host, self.port, self.db = host, port, db
        self.tls = bool(tls)
        self._credentials = {"username": username or None, "password": password or None}
        self.has_password = bool(password)
        self._tls_options = {"ssl_ca_certs": ssl_ca_certs, "ssl_cert_reqs": ssl_cert_reqs,
                             "ssl_check_hostname": ssl_check_hostname}
        shown = f"[{host}]" if ":" in host else host
        user = f"{urllib.parse.quote(username)}@" if username else ""
        self.description = f"{'rediss' if tls else 'redis'}://{user}{shown}:{port}/{db}"
        super().__init__(ttl, renew_interval, poll_interval, margin, key_prefix, connect_timeout, timeout, clock)
        #: The hash of server incarnations (see the scripts); ":" cannot start an election name.
        self.server_key = self.key_prefix + ":server"
        self._push = _Push(self)

    def heirs_key(self, key: str) -> str:
        """The set of the heir channels of ``key``'s election (``<key_prefix>:heirs:<name>``)."""
        return f"{self.key_prefix}:heirs:{key[len(self.key_prefix):]}"

    def releasing_heir(self, key: str) -> str:
        return self._push.releasing_heir(key)

    @classmethod
    def from_url(cls, url: str) -> "RedisOracle":
        """``redis://[[user]:password@]host[:port][/db][?ttl=..&poll_interval=..&...]``;
        ``rediss://`` for TLS. Exactly one server; Sentinel URLs are refused."""
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        shown = redact_text(url)
        if scheme not in ("redis", "rediss"):
            raise ValueError(
                f"{scheme}:// is not supported: Redis Sentinel failover is not tested here (a "
                f"replica promoted after an asynchronous write can lose a lease, see the Redis oracle's "
                f"docs); give the primary's redis:// URL, got {shown!r}"
            )
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"redis:// URL path must be a database number (/0, /1, ...), got {parts.path!r}")
        # The database number checked, the rest is one server's URL like any other's.
        host, port, username, password = one_server(
            urllib.parse.urlunsplit(parts._replace(path="")), scheme, 6379,
            "a lease lives on ONE Redis server (a Cluster or a set of replicas is refused)",
        )
        options = parse_options(url, _OPTIONS)
        if scheme == "redis" and any(key.startswith("ssl_") for key in options):
            raise ValueError("ssl_* options need TLS: use a rediss:// URL")
        return cls(host, port, int(path or 0), username=username, password=password or None,
                   tls=scheme == "rediss", **options)

    # -- what the lease machinery asks ------------------------------------------------------

    def check_key(self, text: str, option: str) -> None:
        if len(text) > 1000 or not all(33 <= ord(c) < 127 for c in text):
            raise ValueError(f"{option} must be at most 1000 printable ASCII characters without spaces, got {text!r}")

    def new_client(self, shared: bool = False) -> "redis.Redis":
        """A redis-py client on a pool of its own (no I/O until its first command); ``shared``:
        a pool of one connection (its users take turns)."""
        kwargs: Dict[str, Any] = dict(
            host=self.host, port=self.port, db=self.db,
            socket_timeout=self.timeout, socket_connect_timeout=self.connect_timeout,
            # A failed call raises at once: the engine retries, within the term's deadline.
            retry=Retry(backoff=NoBackoff(), retries=0),
            redis_connect_func=_check_server,
            connection_class=_ForkSafeSSLConnection if self.tls else _ForkSafeConnection,
            **self._credentials,
        )
        if self.tls:
            kwargs.update(self._tls_options)
        return redis.Redis(connection_pool=redis.ConnectionPool(max_connections=1 if shared else None, **kwargs))

    def new_store(self) -> RedisStore:
        return RedisStore(self)

    def token_floor(self, store: LeaseStore) -> int:
        """``INCR`` of the counter, seeded from the server's clock when absent (see above)."""
        return store.next_token()  # type: ignore[attr-defined]

    def start_term(self, store: LeaseStore, key: str, record: Optional[Dict[str, Any]], version: Any,
                   build: Callable[[Any], bytes]) -> Optional[Tuple[int, bytes]]:
        # The same token as term_token's, taken inside the compare-and-set: a handoff costs one
        # round trip (and one fsync of the append-only file) less.
        return store.start_term(key, version, build, record_token(record) + 1, self.record_expire)  # type: ignore[attr-defined]

    def contender(self, name: str, identity: str, metadata: Dict[str, Any], on_change) -> LeaseContender:
        contender = super().contender(name, identity, metadata, on_change)
        self._push.add(self.key(name), contender)
        return contender

    def close(self) -> None:
        self._push.close()
        super().close()

    def _forget_after_fork(self) -> None:
        super()._forget_after_fork()
        self._push = _Push(self)  # the parent's thread is not in this process
