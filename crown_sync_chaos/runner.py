"""The chaos runner: N contender processes on one oracle, a randomized fault per round, and a
verdict computed from the contenders' own journal only.

Every contender is ``python -m crown_sync.testing.contender`` (its own process, its own session
with the oracle) whose child journals start, a beat every few milliseconds, and stop, with the
term's identity and fencing token and :func:`crown_sync.clock.monotonic` (one clock for every
process on the host, namespaces included; the runner reads it too). The child is a
ProcessChild by default (``--child``): a process child is held to its deadline by the kernel
even while its crown's process is paused. A thread child (``--child thread``, or ``mixed``:
process, command and thread children by slot) can only be told: it checks ``term.stop_event`` between beats, which reads as set once the deadline has
passed, so it too must never be seen working in another term's time.

Round after round, the runner waits for a leader (read from the journal: the term whose beats
are fresh), lets it work a moment, and injects one fault chosen by a seeded RNG (the seed is
printed; the first rounds cover every fault of the oracle once, in random order):

``sigkill``    SIGKILL the leader's crown process (its process child dies with it).
``sigstop``    SIGSTOP the leader past its lease, then SIGCONT; either the crown's process alone
               (its child must stop itself by the deadline), then its whole process group
               the next time (alternating).
``groupstop``  SIGSTOP the leader's whole process group (crown and child, as Ctrl-Z does) past
               its lease, then SIGCONT: every time, so it can be chosen on its own.
``pause-restart``  SIGSTOP the leader's crown process, restart the server (the kind's own
               ``restart``), wait for a new term, SIGCONT. Only for kinds with ``restart``.
``pause-promote``  the same around the kind's ``promote`` (a failover to a standby), for kinds
               with ``promote``.
``dismiss``    ``crown_sync.dismiss``: a graceful handoff.
``revoke``     the oracle's own revocation of the live leader (see the kind), for kinds that
               list it.
``partition``  the contender in its own network namespace is made leader (dismissing others),
               then its veth link is cut (host end: silence; namespace end: unreachable), held
               past the failover (or, sometimes, only briefly), and healed.
``restart`` / ``terminate`` / ``expire`` / ``flush``: server faults, see
               :mod:`crown_sync_chaos.kinds`.

``stop_delay`` makes every contender's child slow to stop: it keeps working that many seconds
after SIGTERM (a daemon that takes a while to honour it, the normal case), within ``grace``.

Then it waits for the next leader (a new term when the fault must end the old one). At the end
``crown_sync.testing.journal.check`` gives overlapping terms and token order violations, which
must both be 0; leaderless gaps between consecutive terms are attributed to the round in which
they began and compared with the oracle's bound for that round (the oracle's own bound plus the
time the server was down).
"""

import collections
import json
import os
import random
import signal
import subprocess
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional

from crown_sync.clock import monotonic as _now  # the journal's clock: compare its times with it
from crown_sync.testing.fleet import contender_command, contender_environment
from crown_sync.testing.fleet import poll as _wait
from crown_sync.testing.fleet import process_state as _process_state

from . import kinds as kinds_module
from .netns import Netns, NetnsUnavailable, netns_problem

__all__ = ["Runner", "run_oracle", "ROOT", "kind_faults"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_LOGGING_MAIN = (
    "import logging, sys; logging.basicConfig(level=LEVEL, format='%(created).6f %(threadName)s "
    "%(name)s %(message)s'); logging.getLogger('psycopg').setLevel('INFO'); "
    "logging.getLogger('kazoo').setLevel('INFO'); "
    "from crown_sync.testing.contender import main; sys.exit(main(sys.argv[1:]))"
)

#: A term is "current" if its last journal line is at most this old (s).
FRESH = 0.3

#: Faults the runner adds to a kind's own: (fault, the kind's fault it needs, the kind's fault
#: whose expectations it shares, i.e. whether it must end the term).
_GENERIC = (("groupstop", "sigstop", "sigstop"), ("pause-restart", "restart", "restart"),
            ("pause-promote", "promote", "promote"))
_CHILDREN = ("process", "command", "thread")


def kind_faults(kind_class) -> List[str]:
    """Every fault a run on ``kind_class`` can inject: the kind's own, plus the runner's generic
    ones that it supports (``groupstop`` with ``sigstop``, ``pause-restart`` with ``restart``,
    ``pause-promote`` with ``promote``)."""
    faults = list(kind_class.faults)
    faults += [fault for fault, needs, _ in _GENERIC if needs in kind_class.faults]
    return faults


def _as_kind_fault(fault: str) -> str:
    return {fault: like for fault, _, like in _GENERIC}.get(fault, fault)


def _seconds_option(option: str, value: Any, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{option} must be a number of seconds, got {value!r}")
    if value < 0 or (positive and value == 0) or value == float("inf"):
        raise ValueError(f"{option} must be {'> 0' if positive else '>= 0'} and finite, got {value!r}")
    return float(value)


class _LineTail:
    """Follows a file of JSON lines as it grows: ``poll()`` hands each new complete line to
    ``_line`` (a line still being written waits for the next poll)."""

    def __init__(self, path: str):
        self.path = path
        self.offset = 0

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n")
        if end < 0:
            return
        self.offset += end + 1
        for line in data[: end + 1].splitlines():
            if line.strip():
                self._line(line)

    def _line(self, line: bytes) -> None:
        raise NotImplementedError


class JournalTail(_LineTail):
    """Follows the journal as it grows; knows every term and which one leads now.

    This is only the runner's view for choosing targets; the verdict comes from
    ``crown_sync.testing.journal.check`` reading the whole file afterwards.
    """

    def __init__(self, path: str):
        super().__init__(path)
        self.terms: Dict[tuple, Dict[str, Any]] = {}

    def _line(self, line: bytes) -> None:
        event = json.loads(line)
        key = (event["id"], event["token"], event["pid"])
        term = self.terms.get(key)
        if term is None:
            term = self.terms[key] = {"identity": event["id"], "token": event["token"],
                                      "pid": event["pid"], "start": event["t"], "last": event["t"],
                                      "stopped": False, "lines": 0}
        term["lines"] += 1
        term["start"] = min(term["start"], event["t"])
        term["last"] = max(term["last"], event["t"])
        if event["ev"] == "stop":
            term["stopped"] = True

    def leader(self, now: Optional[float] = None) -> Optional[Dict[str, Any]]:
        now = _now() if now is None else now
        live = [t for t in self.terms.values() if not t["stopped"] and t["last"] >= now - FRESH]
        return max(live, key=lambda t: t["start"]) if live else None

    def started_after(self, moment: float, exclude: Optional[str] = None) -> List[Dict[str, Any]]:
        return sorted((t for t in self.terms.values() if t["start"] > moment and t["identity"] != exclude),
                      key=lambda t: t["start"])


class EventTail(_LineTail):
    """Follows the contenders' telemetry events file: who has reached the following phase."""

    READY = ("crown.leadership.rejected", "crown.monitor.started", "crown.leadership.claimed")

    def __init__(self, path: str):
        super().__init__(path)
        self.ready = set()

    def _line(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            return
        if event.get("event") in self.READY and event.get("identity"):
            self.ready.add(event["identity"])


class Contender:
    """One contender process (a slot may be refilled by a new process after a SIGKILL)."""

    def __init__(self, slot: int, identity: str, popen: subprocess.Popen, in_netns: bool, log: str,
                 child: str = "process"):
        self.slot = slot
        self.identity = identity
        self.child = child
        self.popen = popen
        self.in_netns = in_netns
        self.log = log
        self.expected_exit = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, chars: int = 2000) -> str:
        try:
            with open(self.log, "r", errors="replace") as handle:
                return handle.read()[-chars:]
        except OSError:
            return ""


class Runner:
    """One run of rounds against one oracle kind. ``run()`` returns the result dict."""

    def __init__(
        self,
        kind_class,
        contenders: int = 3,
        rounds: Optional[int] = None,
        seconds: Optional[float] = None,
        seed: Optional[int] = None,
        lease: float = 2.0,
        workdir: Optional[str] = None,
        child: str = "process",
        interval: float = 0.005,
        soak: bool = False,
        segment_rounds: Optional[int] = None,
        require_partition: bool = False,
        faults: Optional[List[str]] = None,
        stop_delay: float = 0.0,
        grace: float = 2.0,
        log: Callable[[str], None] = print,
    ):
        if contenders < 2:
            raise ValueError(f"contenders must be at least 2, got {contenders}")
        if rounds is None and seconds is None:
            raise ValueError("give rounds, seconds or both")
        if child not in _CHILDREN + ("mixed",):
            raise ValueError(f"child must be process, command, thread or mixed, got {child!r}")
        self.stop_delay = _seconds_option("stop_delay", stop_delay, positive=False)
        self.grace = _seconds_option("grace", grace, positive=True)
        self.kind_class = kind_class
        self.count = contenders
        self.rounds = rounds
        self.seconds = seconds
        self.seed = seed if seed is not None else random.SystemRandom().randrange(2 ** 32)
        self.rng = random.Random(self.seed)
        self.sigstops = 0
        self.lease = lease
        self.workdir = workdir or tempfile.mkdtemp(prefix=f"crown-sync-chaos-{kind_class.name}-")
        self.child = child
        self.interval = interval
        self.soak = soak
        self.segment_rounds = segment_rounds
        self.require_partition = require_partition
        unknown = sorted(set(faults or ()) - set(kind_faults(kind_class)))
        if unknown:
            raise ValueError(f"{kind_class.name} has no fault {', '.join(unknown)}; it has "
                             f"{', '.join(kind_faults(kind_class))}")
        self.only_faults = list(faults) if faults else None
        self.log = log
        self.name = f"chaos-{kind_class.name}"
        self.kind = None
        self.netns: Optional[Netns] = None
        self.partition_status = "n/a (single host)"
        self.procs: Dict[int, Contender] = {}
        self.generation = 0
        self.journals: List[str] = []
        self.tail: Optional[JournalTail] = None
        self.records: List[Dict[str, Any]] = []
        self.unexpected_exits: List[Dict[str, Any]] = []

    # ------------------------------------------------------------------------- processes

    def _say(self, text: str) -> None:
        self.log(f"[{self.kind_class.name}] {text}")

    def _spawn(self, slot: int) -> Contender:
        in_netns = self.netns is not None and slot == 0
        self.generation += 1
        identity = f"{self.kind_class.name}-s{slot}-g{self.generation}" + ("-netns" if in_netns else "")
        child = self.child
        if child == "mixed":
            child = _CHILDREN[slot % len(_CHILDREN)]
        argv = contender_command(self.name, self.kind.url(in_netns=in_netns), self.journals[-1], identity,
                                 child, self.events.path, self.grace, self.interval, self.stop_delay,
                                 monitor_delay=1)
        level = os.environ.get("CROWN_SYNC_CHAOS_LOGLEVEL")
        if level:  # debugging aid: the contender's own logging into its log file
            argv[1:3] = ["-c", _LOGGING_MAIN.replace("LEVEL", repr(level.upper()))]
        if in_netns:
            argv = self.netns.command(argv)
        log = os.path.join(self.workdir, f"{identity}.log")
        with open(log, "ab") as handle:
            popen = subprocess.Popen(argv, cwd=ROOT, env=contender_environment(), stdin=subprocess.DEVNULL,
                                     stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        proc = Contender(slot, identity, popen, in_netns, log, child=child)
        self.procs[slot] = proc
        return proc

    def _fill(self) -> None:
        """Replace contenders that died (SIGKILLed ones, and any that exited by themselves), and
        wait until every new one has contended once (claimed or found the leader)."""
        spawned = []
        for slot in range(self.count):
            proc = self.procs.get(slot)
            if proc is not None and proc.alive():
                continue
            if proc is not None and not proc.expected_exit:
                self.unexpected_exits.append({"identity": proc.identity, "code": proc.popen.returncode,
                                              "log": proc.log_tail()})
                self._say(f"contender {proc.identity} exited by itself ({proc.popen.returncode}):\n"
                          + proc.log_tail())
            spawned.append(self._spawn(slot))

        def ready():
            self.events.poll()
            return all(p.identity in self.events.ready or not p.alive() for p in spawned)

        if spawned and not _wait(ready, 60, interval=0.05):
            late = [p.identity for p in spawned if p.identity not in self.events.ready]
            self._say(f"contenders {late} have not contended after 60 s")

    def _stop_all(self) -> None:
        procs = list(self.procs.values())
        for proc in procs:
            proc.expected_exit = True
            if proc.alive():
                try:
                    os.killpg(proc.pid, signal.SIGCONT)  # never leave one paused
                except ProcessLookupError:
                    pass
                proc.popen.send_signal(signal.SIGTERM)
        deadline = _now() + 30
        for proc in procs:
            try:
                proc.popen.wait(max(0.1, deadline - _now()))
            except subprocess.TimeoutExpired:
                self._say(f"contender {proc.identity} did not stop on SIGTERM: SIGKILL\n" + proc.log_tail())
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.popen.wait()
        self.procs.clear()

    def _by_identity(self, identity: Optional[str]) -> Optional[Contender]:
        for proc in self.procs.values():
            if proc.identity == identity:
                return proc
        return None

    # ------------------------------------------------------------------------- waiting

    def _poll_leader(self):
        self.tail.poll()
        return self.tail.leader()

    def _recovery_timeout(self, downtime: float = 0.0) -> float:
        return 3 * self.kind.bound() + downtime + 30.0

    def _wait_leader(self, timeout: float, after: Optional[float] = None, exclude: Optional[str] = None):
        """A current leader (whose term started after ``after``, not ``exclude``), or None."""

        def found():
            leader = self._poll_leader()
            if leader is None:
                return None
            if after is not None and leader["start"] <= after:
                return None
            if exclude is not None and leader["identity"] == exclude:
                return None
            return leader

        return _wait(found, timeout)

    # ------------------------------------------------------------------------- faults

    def _sigkill(self, leader, proc) -> Dict[str, Any]:
        proc.expected_exit = True
        os.kill(proc.pid, signal.SIGKILL)
        code = proc.popen.wait(30)
        return {"target": proc.identity, "confirmed": code == -signal.SIGKILL}

    def _sigstop(self, leader, proc) -> Dict[str, Any]:
        # Alternate, starting with the crown's process alone: its process child keeps running
        # and must stop itself by the deadline, the case every run has to cover.
        group = self.sigstops % 2 == 1
        self.sigstops += 1
        return self._pause(proc, group)

    def _pause(self, proc, group: bool) -> Dict[str, Any]:
        """SIGSTOP the crown's process (or its whole process group) past the lease, then SIGCONT."""
        pause = round(self.kind.pause_seconds(self.rng), 2)
        send = os.killpg if group else os.kill  # the contender leads its own process group
        send(proc.pid, signal.SIGSTOP)
        confirmed = bool(_wait(lambda: _process_state(proc.pid) == "T", 5))
        time.sleep(pause)
        send(proc.pid, signal.SIGCONT)
        return {"target": proc.identity, "scope": "process group" if group else "crown process",
                "pause": pause, "confirmed": confirmed}

    def _pause_restart(self, leader, proc, fault: str = "pause-restart") -> Dict[str, Any]:
        """SIGSTOP the leader's crown process, restart the server (or, for ``pause-promote``, fail
        over to a standby), wait for a new term, SIGCONT: neither may let a successor start while
        the paused leader's child may run."""
        os.kill(proc.pid, signal.SIGSTOP)
        paused = bool(_wait(lambda: _process_state(proc.pid) == "T", 5))
        anchor = _now()
        try:
            if fault == "pause-promote":
                restart = self.kind.inject("promote", self.rng, leader, self.name)
            else:
                restart = self.kind.restart_server(self.rng, leader, self.name)
            downtime = float(restart.get("downtime") or 0.0)
            successor = self._wait_leader(self._recovery_timeout(downtime), after=anchor, exclude=proc.identity)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        shown = {k: v for k, v in restart.items() if k not in ("confirmed", "downtime")}
        return {"anchor": anchor, "target": proc.identity, "restart": shown, "downtime": downtime,
                "successor_while_paused": successor is not None,
                "confirmed": paused and bool(restart.get("confirmed"))}

    def _dismiss(self, leader, proc) -> Dict[str, Any]:
        import crown_sync

        done = crown_sync.dismiss(self.name, oracle=self.kind.url())
        return {"target": leader["identity"], "confirmed": bool(done)}

    def _partition(self, leader, proc) -> Dict[str, Any]:
        import crown_sync

        inside = self.procs[0]
        rotations = stops = 0

        def inside_leads():
            current = self._poll_leader()
            return current is not None and current["identity"] == inside.identity

        # Make the contender in the namespace the leader: dismissals rotate the crown on queue
        # oracles (ZooKeeper, Postgres); where the dismissed leader wins again at once
        # (memcached, file), stop leaders gracefully until it wins, then refill the fleet.
        for _ in range(self.count):
            if inside_leads():
                break
            moment = _now()
            try:
                crown_sync.dismiss(self.name, oracle=self.kind.url())
            except Exception as exc:  # the oracle may be busy electing; try again
                self._say(f"dismiss failed while rotating: {exc}")
            rotations += 1
            self._wait_leader(self.kind.bound() + 10, after=moment)
        for _ in range(self.count - 1):
            if inside_leads() or not inside.alive():
                break
            current = self._poll_leader()
            victim = self._by_identity(current["identity"]) if current else None
            if victim is None:
                break
            moment = _now()
            victim.expected_exit = True
            victim.popen.send_signal(signal.SIGTERM)
            try:
                victim.popen.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(victim.pid, signal.SIGKILL)
                victim.popen.wait()
            stops += 1
            self._wait_leader(self._recovery_timeout(), after=moment)
        if stops:
            self._fill()
        current = self._poll_leader()
        leader_partitioned = current is not None and current["identity"] == inside.identity
        side = self.rng.choice(["host", "netns"])
        short = leader_partitioned and self.rng.random() < 0.25
        cut_at = _now()
        self.netns.cut(side)
        confirmed = self.netns.link_down(side)
        try:
            if short:
                time.sleep(round(self.rng.uniform(0.2, 0.8 * self.lease), 2))
            else:
                if leader_partitioned:
                    self._wait_leader(self._recovery_timeout(), after=cut_at, exclude=inside.identity)
                time.sleep(round(self.rng.uniform(0.3, 1.0), 2))
        finally:
            held = _now() - cut_at
            self.netns.heal()
        return {"anchor": cut_at, "target": inside.identity, "side": side, "rotations": rotations,
                "graceful_stops": stops,
                "leader_partitioned": leader_partitioned, "short": short, "held": round(held, 2),
                "confirmed": confirmed}

    def _inject(self, fault: str, leader, proc) -> Dict[str, Any]:
        if fault == "sigkill":
            return self._sigkill(leader, proc)
        if fault == "sigstop":
            return self._sigstop(leader, proc)
        if fault == "groupstop":
            return self._pause(proc, group=True)
        if fault in ("pause-restart", "pause-promote"):
            return self._pause_restart(leader, proc, fault)
        if fault == "dismiss":
            return self._dismiss(leader, proc)
        if fault == "partition":
            return self._partition(leader, proc)
        return self.kind.inject(fault, self.rng, leader, self.name)

    # ------------------------------------------------------------------------- rounds

    def _faults(self) -> List[str]:
        faults = list(self.only_faults or kind_faults(self.kind_class))
        if self.netns is None and "partition" in faults:
            faults.remove("partition")
        return faults

    def _schedule(self):
        """Every fault once in random order, then again, and so on (in soak: forever)."""
        faults = self._faults()
        while True:
            cycle = list(faults)
            self.rng.shuffle(cycle)
            for fault in cycle:
                yield fault

    def _round(self, number: int, fault: str) -> Dict[str, Any]:
        record: Dict[str, Any] = {"round": number, "fault": fault, "t_begin": _now()}
        self._fill()
        leader = self._wait_leader(self._recovery_timeout())
        if leader is None:
            record.update(stalled=True, confirmed=False, details={"error": "no leader before the fault"})
            self._say(f"round {number}: no leader appeared; fault {fault} not injected")
            return record
        time.sleep(self.rng.uniform(0.1, 0.6))
        leader = self._poll_leader() or leader
        proc = self._by_identity(leader["identity"])
        if proc is None and fault in ("sigkill", "sigstop", "groupstop", "pause-restart", "pause-promote"):
            record.update(stalled=True, confirmed=False, details={"error": f"unknown leader {leader['identity']}"})
            return record
        t_inject = _now()
        try:
            details = self._inject(fault, leader, proc)
        except Exception as exc:  # recorded as an unconfirmed fault; the run goes on
            details = {"confirmed": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
            self._say(f"round {number}: injecting {fault} failed: {details['error']}")
        t_end = _now()
        expects = self.kind.expects_new_term(_as_kind_fault(fault), details)
        downtime = float(details.get("downtime") or 0.0)
        timeout = self._recovery_timeout(downtime)
        # The moment the fault hit (a partition is cut after the rotation that precedes it).
        anchor = details.pop("anchor", t_inject)
        if expects:
            successor = self._wait_leader(timeout, after=anchor)
        else:
            successor = _wait(lambda: (lambda l: l if l and l["last"] > t_end else None)(self._poll_leader()),
                              timeout)
        first_new = self.tail.started_after(anchor)
        record.update(
            t_inject=t_inject, t_end=t_end, leader=leader["identity"], token=leader["token"],
            child=proc.child if proc is not None else None,
            details=details, confirmed=bool(details.get("confirmed")), downtime=downtime,
            expects_new_term=expects, new_term=bool(first_new),
            failover_s=round(first_new[0]["start"] - anchor, 4) if first_new else None,
            stalled=successor is None,
        )
        shown = {k: v for k, v in details.items() if k not in ("confirmed",)}
        self._say(
            f"round {number}: {fault} ({record['child']} child) {json.dumps(shown, default=str)} -> "
            + (f"next term after {record['failover_s']:.3f} s" if record["failover_s"] is not None else "same term")
            + ("" if record["confirmed"] else "  [NOT CONFIRMED]")
            + ("  [STALLED: no leader afterwards]" if record["stalled"] else "")
        )
        return record

    # ------------------------------------------------------------------------- run

    def _setup_netns(self) -> None:
        wanted = self.only_faults or kind_faults(self.kind_class)
        if not self.kind_class.partitionable or "partition" not in wanted:
            return
        problem = netns_problem()
        if problem is None:
            try:
                self.netns = Netns.create(self.rng)
            except NetnsUnavailable as exc:
                problem = str(exc)
        if self.netns is not None:
            self.partition_status = f"yes ({self.netns.ns_ip} <-> {self.netns.host_ip})"
            return
        self.partition_status = f"UNAVAILABLE: {problem}"
        message = f"NO NETWORK PARTITIONS: {problem}"
        if self.require_partition:
            raise NetnsUnavailable(message + " (required here: CI=true or --require-partition)")
        self._say(message)

    def _new_segment(self) -> None:
        number = len(self.journals) + 1
        path = os.path.join(self.workdir, f"journal-{number}.jsonl")
        self.journals.append(path)
        self.tail = JournalTail(path)
        self.events = EventTail(os.path.join(self.workdir, f"events-{number}.jsonl"))

    def run(self) -> Dict[str, Any]:
        started = _now()
        self._say(f"seed {self.seed}, {self.count} contenders, lease {self.lease} s, child {self.child}, "
                  f"stop delay {self.stop_delay} s, grace {self.grace} s, workdir {self.workdir}")
        try:
            self._setup_netns()
            self.kind = self.kind_class(self.lease, self.workdir, self.netns)
            self.kind.start()
            self._say(f"oracle {self.kind.url()}; faults: {', '.join(self._faults())}; "
                      f"partition: {self.partition_status}")
            self._new_segment()
            self._fill()
            schedule = self._schedule()
            number = 0
            in_segment = 0
            while True:
                if self.rounds is not None and number >= self.rounds and not self.soak:
                    break
                if self.seconds is not None and _now() - started >= self.seconds:
                    break
                if self.soak and self.rounds is not None and number >= self.rounds:
                    break
                if self.segment_rounds and in_segment >= self.segment_rounds:
                    self._stop_all()
                    self._say(f"segment {len(self.journals)}: {self._check(self.journals[-1]).summary()}")
                    self._new_segment()
                    self._fill()
                    in_segment = 0
                number += 1
                in_segment += 1
                self.records.append(self._round(number, next(schedule)))
            self._fill()  # a contender that died by itself in the last round is counted too
        finally:
            try:
                self._stop_all()
            finally:
                if self.kind is not None:
                    self.kind.stop()
                if self.netns is not None:
                    self.netns.destroy()
        return self._result(_now() - started)

    # ------------------------------------------------------------------------- verdict

    @staticmethod
    def _check(path: str):
        from crown_sync.testing import journal

        return journal.check(path)

    def _round_bound(self, record: Dict[str, Any]) -> float:
        return self.kind.bound() + float(record.get("downtime") or 0.0)

    def _result(self, duration: float) -> Dict[str, Any]:
        terms_total = overlaps = violations = 0
        overlap_text: List[str] = []
        gaps: List[Dict[str, Any]] = []
        last_token = None
        segment_token_violations = 0
        for path in self.journals:
            if not os.path.exists(path):
                continue
            report = self._check(path)
            terms_total += len(report.terms)
            overlaps += len(report.overlaps)
            violations += len(report.token_violations)
            if report.overlaps or report.token_violations:
                overlap_text.append(report.summary())
            if report.terms:
                first = report.terms[0].token
                if last_token is not None and (first is None or first <= last_token):
                    segment_token_violations += 1
                last_token = report.terms[-1].token
            for earlier, later in zip(report.terms, report.terms[1:]):
                gaps.append({"from": earlier.end, "gap": later.start - earlier.end,
                             "identities": (earlier.identity, later.identity)})
        violations += segment_token_violations
        # Attribute each gap to the round during which the old term ended.
        begins = [r["t_begin"] for r in self.records]
        over = []
        worst = None
        for gap in gaps:
            index = None
            for i, begin in enumerate(begins):
                if gap["from"] >= begin:
                    index = i
            if index is None:
                continue  # before the first round: the initial election
            record = self.records[index]
            bound = self._round_bound(record)
            record["max_gap_s"] = max(record.get("max_gap_s", 0.0), round(gap["gap"], 4))
            if worst is None or gap["gap"] > worst["gap"]:
                worst = dict(gap, round=record["round"], fault=record["fault"], bound=bound)
            if gap["gap"] > bound:
                over.append({"round": record["round"], "fault": record["fault"],
                             "gap_s": round(gap["gap"], 3), "bound_s": round(bound, 3)})
        faults = collections.Counter(r["fault"] for r in self.records)
        failovers: Dict[str, List[float]] = {}
        for r in self.records:
            if r.get("failover_s") is not None:
                failovers.setdefault(r["fault"], []).append(r["failover_s"])
        result = {
            "oracle": self.kind_class.name,
            "seed": self.seed,
            "contenders": self.count,
            "child": self.child,
            "stop_delay": self.stop_delay,
            "grace": self.grace,
            "settings": self.kind.describe() if self.kind else {},
            "partition": self.partition_status,
            "rounds": len(self.records),
            "faults": dict(sorted(faults.items())),
            "confirmed": sum(1 for r in self.records if r.get("confirmed")),
            "unconfirmed": [r["round"] for r in self.records if not r.get("confirmed")],
            "leader_partitions": sum(1 for r in self.records if r["fault"] == "partition"
                                     and (r.get("details") or {}).get("leader_partitioned")),
            "failover_s": failovers,
            "terms": terms_total,
            "new_term_rounds": sum(1 for r in self.records if r.get("new_term")),
            "missing_new_terms": [r["round"] for r in self.records
                                  if r.get("expects_new_term") and not r.get("new_term")],
            "stalled": [r["round"] for r in self.records if r.get("stalled")],
            "overlaps": overlaps,
            "token_violations": violations,
            "violations_text": overlap_text,
            "max_gap_s": round(worst["gap"], 4) if worst else 0.0,
            "max_gap_round": {"round": worst["round"], "fault": worst["fault"]} if worst else None,
            "max_gap_bound_s": round(worst["bound"], 3) if worst else None,
            "bound_s": round(self.kind.bound(), 3) if self.kind else None,
            "over_bound": over,
            "unexpected_exits": [{k: v for k, v in e.items() if k != "log"} for e in self.unexpected_exits],
            "journals": list(self.journals),
            "duration_s": round(duration, 1),
            "records": [{k: v for k, v in r.items() if not k.startswith("t_")} for r in self.records],
        }
        result["ok"] = overlaps == 0 and violations == 0
        return result


def run_oracle(name: str, **options) -> Dict[str, Any]:
    """Run the chaos rounds on the oracle kind ``name`` (see :class:`Runner` for options)."""
    return Runner(kinds_module.get_kind(name), **options).run()
