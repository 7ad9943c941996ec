"""``crown-sync demo``: an election, a crash and a takeover, on this host, in well under a minute.

The parent starts N contender processes (``python -m crown_sync demo-contender ...``), each a
:class:`crown_sync.Crown` on the embedded file oracle in a fresh private temporary directory.
The leader's child journals its work (:mod:`crown_sync.testing.journal`) and reports progress.
Every contender reports its own telemetry events to the parent as JSON lines on its stdout, each
stamped with ``time.monotonic()`` (CLOCK_MONOTONIC: one clock for every process on a Linux host).

Each round the parent SIGKILLs the leader, then waits for another contender's own
``crown.leadership.claimed`` event; the failover time is that event's time minus the time just
before the kill. A replacement contender joins so there are always N. At the end the followers
stop first, then the leader (so the end is not a cascade of handoffs), and the journal, written by
the work itself and never by the oracle, is checked: no two terms overlapped, tokens rose.

Contenders ignore SIGINT (the parent orchestrates a clean stop on Ctrl-C) and stop by themselves
when their stdin closes, so they never outlive the parent.
"""

import json
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

import click

__all__ = ["run_demo", "contender_main"]

ELECTION = "demo"
#: Generous bounds so a loaded machine does not fail the demo; a normal run takes a few seconds.
STARTUP_TIMEOUT = 30.0
TAKEOVER_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
TICKS_BEFORE_KILL = 2


class DemoFailed(Exception):
    """Something did not happen in time; the message says what."""


# ---------------------------------------------------------------------------------- contender


def contender_main(name: str, identity: str, oracle_url: str, journal_path: str, tick: float) -> int:
    """One contender: a Crown whose child journals its work and reports progress to the parent."""
    import crown_sync
    from crown_sync import telemetry
    from crown_sync.testing.journal import Journal

    # Ctrl-C in a terminal reaches the whole process group: let the parent decide the order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out_lock = threading.Lock()

    def send(kind: str, **fields) -> None:
        fields.update(kind=kind, id=identity, pid=os.getpid(), t=time.monotonic())
        data = (json.dumps(fields, default=str) + "\n").encode()
        with out_lock:  # one write per line (< PIPE_BUF): lines never interleave
            try:
                os.write(1, data)
            except OSError:
                pass  # the parent is gone; stdin EOF will stop us

    def on_event(event: str, metadata: dict) -> None:
        # Refreshes (several a second on the file oracle) tell the parent nothing new.
        if event == "crown.leadership.refreshed":
            return
        if metadata.get("name") == name and metadata.get("identity") == identity:
            send("event", event=event, phase=metadata.get("phase"), token=metadata.get("token"),
                 reason=metadata.get("reason"))

    def work(term) -> None:
        journal = Journal(journal_path)
        try:
            journal.write("start", term.name, term.identity, term.token)
            send("work", state="start", token=term.token)
            ticks = 0
            next_tick = time.monotonic() + tick
            # Beat often: after a SIGKILL the last beat is where this term's work provably ended.
            while not term.stop_event.wait(0.01):
                journal.write("beat", term.name, term.identity, term.token)
                if time.monotonic() >= next_tick:
                    ticks += 1
                    next_tick += tick
                    send("work", state="tick", n=ticks, token=term.token)
            journal.write("stop", term.name, term.identity, term.token)
            send("work", state="stop", token=term.token, ticks=ticks)
        finally:
            journal.close()

    telemetry.attach(on_event)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())

    def watch_stdin() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        done.set()

    threading.Thread(target=watch_stdin, name="stdin-watch", daemon=True).start()
    crown = crown_sync.Crown(name, oracle=oracle_url, child=work, identity=identity)
    crown.start()
    send("ready")
    while not done.wait(0.5):
        pass
    crown.stop()
    send("bye")
    return 0


# ------------------------------------------------------------------------------------- parent


class Contender:
    def __init__(self, identity: str, process: subprocess.Popen, log_path: str):
        self.identity = identity
        self.process = process
        self.log_path = log_path
        self.state = "starting"  # starting, following, leading, killed, stopped
        self.token: Optional[int] = None
        self.ticks = 0

    @property
    def pid(self) -> int:
        return self.process.pid


class Demo:
    def __init__(self, contenders: int, rounds: int, keep: bool):
        self.n = contenders
        self.rounds = rounds
        self.keep = keep
        self.tmpdir = tempfile.mkdtemp(prefix="crown-sync-demo-")  # mode 0700
        os.chmod(self.tmpdir, 0o700)
        self.oracle_url = "file://" + os.path.join(self.tmpdir, "oracle")
        self.journal_path = os.path.join(self.tmpdir, "journal.jsonl")
        self.events: "queue.Queue[dict]" = queue.Queue()
        self.contenders: Dict[str, Contender] = {}
        self.order: List[str] = []
        self.serial = 0
        self.leader: Optional[Contender] = None
        self.failovers: List[float] = []
        self.tokens: List[int] = []
        self._expected_exits: set = set()  # contenders whose exit is no surprise

    # -- output

    @staticmethod
    def say(text: str = "", **style) -> None:
        # click.echo drops the colours when stdout is not a terminal.
        click.echo(click.style(text, **style) if style else text)

    def line(self, who: str, text: str, **style) -> None:
        self.say(f"  {who:<4} {text}", **style)

    # -- processes

    def spawn(self) -> Contender:
        self.serial += 1
        identity = f"c{self.serial}"
        log_path = os.path.join(self.tmpdir, f"{identity}.log")
        env = dict(os.environ)
        # The contenders import this very copy of crown_sync, installed or not.
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        env.pop("CROWN_SYNC_ORACLE", None)
        argv = [
            sys.executable, "-m", "crown_sync", "demo-contender",
            "--name", ELECTION, "--identity", identity, "--oracle", self.oracle_url,
            "--journal", self.journal_path,
        ]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env,
                close_fds=True,
            )
        contender = Contender(identity, process, log_path)
        self.contenders[identity] = contender
        self.order.append(identity)
        threading.Thread(target=self._read, args=(contender,), daemon=True).start()
        return contender

    def _read(self, contender: Contender) -> None:
        for raw in contender.process.stdout:
            try:
                message = json.loads(raw)
            except ValueError:
                continue  # a line cut short by SIGKILL
            self.events.put(message)
        self.events.put({"kind": "eof", "id": contender.identity, "t": time.monotonic()})

    def alive(self) -> List[Contender]:
        return [c for c in self.contenders.values() if c.state not in ("killed", "stopped")]

    # -- events

    def next_event(self, deadline: float, waiting_for: str) -> dict:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DemoFailed(f"timed out waiting for {waiting_for}")
        try:
            message = self.events.get(timeout=remaining)
        except queue.Empty:
            raise DemoFailed(f"timed out waiting for {waiting_for}") from None
        self.apply(message)
        return message

    def apply(self, message: dict) -> None:
        contender = self.contenders.get(message.get("id"))
        if contender is None:
            return
        kind = message.get("kind")
        if kind == "event":
            event = message.get("event")
            if event == "crown.leadership.claimed":
                contender.state = "leading"
                contender.token = message.get("token")
                contender.ticks = 0
            elif event in ("crown.leadership.rejected", "crown.monitor.started"):
                if contender.state in ("starting", "leading"):
                    contender.state = "following"
            elif event in ("crown.leadership.lost", "crown.leadership.abdicated"):
                if contender.state == "leading":
                    contender.state = "following"
        elif kind == "work":
            if message.get("state") == "start" and message.get("token") is not None:
                contender.token = message.get("token")
            if message.get("state") == "tick":
                contender.ticks = max(contender.ticks, int(message.get("n") or 0))
        elif kind == "eof" and contender.state not in ("killed", "stopped"):
            if contender.process.poll() is None:
                contender.process.wait(5)
            contender.state = "stopped"
            if contender.identity not in self._expected_exits:
                raise DemoFailed(
                    f"contender {contender.identity} exited unexpectedly "
                    f"(code {contender.process.returncode})"
                )

    def wait_until(self, condition, timeout: float, waiting_for: str) -> List[dict]:
        deadline = time.monotonic() + timeout
        seen = []
        while not condition():
            seen.append(self.next_event(deadline, waiting_for))
        return seen

    def drain(self) -> None:
        while True:
            try:
                self.apply(self.events.get_nowait())
            except queue.Empty:
                return

    # -- the story

    def start(self) -> None:
        self.say(
            f"crown-sync demo: {self.n} contenders, {self.rounds} round"
            f"{'s' if self.rounds != 1 else ''}, election {ELECTION!r}", bold=True,
        )
        self.say(f"  oracle  embedded file oracle in {self.tmpdir} (private, mode 0700)")
        self.say()
        for _ in range(self.n):
            contender = self.spawn()
            self.line(contender.identity, f"pid {contender.pid:<7} started")
        self.wait_until(
            lambda: any(c.state == "leading" for c in self.alive()),
            STARTUP_TIMEOUT, "the first leader",
        )
        self.leader = next(c for c in self.alive() if c.state == "leading")
        self.wait_for_steady_state(STARTUP_TIMEOUT)
        self.tokens.append(self.leader.token)
        self.line(self.leader.identity, f"leads with token {self.leader.token}", fg="green", bold=True)
        self.show_work()

    def wait_for_steady_state(self, timeout: float) -> None:
        """The leader's child has done some work, and every other contender follows."""
        leader = self.leader

        def steady() -> bool:
            followers_ready = all(
                c.state == "following" for c in self.alive() if c is not leader
            )
            return leader.ticks >= TICKS_BEFORE_KILL and followers_ready

        self.wait_until(steady, timeout, f"{leader.identity}'s child to work and the others to follow")

    def show_work(self) -> None:
        leader = self.leader
        self.line(
            leader.identity,
            f"child working under token {leader.token}: {leader.ticks} ticks so far; "
            f"{len(self.alive()) - 1} following",
        )

    def round(self, number: int) -> None:
        self.say()
        self.say(f"round {number}/{self.rounds}", bold=True)
        victim = self.leader
        self._expected_exits.add(victim.identity)
        self.drain()
        t_kill = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        victim.state = "killed"
        self.line(victim.identity, f"SIGKILL (pid {victim.pid}, leader with token {victim.token})", fg="red")
        new_leader: List[Contender] = []
        claimed_at: List[float] = []

        def taken_over() -> bool:
            return bool(new_leader)

        deadline = time.monotonic() + TAKEOVER_TIMEOUT
        while not taken_over():
            message = self.next_event(deadline, "another contender to take over")
            if message.get("kind") == "event" and message.get("event") == "crown.leadership.claimed":
                if message["id"] == victim.identity:
                    continue  # its last words, written before the kill
                if message["t"] < t_kill:
                    raise DemoFailed(f"{message['id']} claimed leadership while {victim.identity} still led")
                new_leader.append(self.contenders[message["id"]])
                claimed_at.append(message["t"])
        victim.process.wait(10)
        leader = new_leader[0]
        failover = claimed_at[0] - t_kill
        self.failovers.append(failover)
        self.leader = leader
        self.line(
            leader.identity,
            f"leads with token {leader.token}   failover {failover * 1000:.1f} ms",
            fg="green", bold=True,
        )
        replacement = self.spawn()
        self.line(replacement.identity, f"pid {replacement.pid:<7} joins as a replacement")
        self.wait_for_steady_state(TAKEOVER_TIMEOUT)
        self.tokens.append(leader.token)
        self.show_work()

    def stop_all(self) -> None:
        self.say()
        self.say("stopping: followers first, then the leader", bold=True)
        leader = self.leader
        followers = [c for c in self.alive() if c is not leader]
        for group in (followers, [leader] if leader in self.alive() else []):
            for contender in group:
                self._expected_exits.add(contender.identity)
                self._close_stdin(contender)
            for contender in group:
                self._wait_exit(contender)
                self.line(
                    contender.identity,
                    "stopped cleanly (child stopped, leadership given up)" if contender is leader
                    else "stopped cleanly",
                )

    @staticmethod
    def _close_stdin(contender: Contender) -> None:
        try:
            contender.process.stdin.close()  # the contender stops on EOF
        except OSError:
            pass

    def _wait_exit(self, contender: Contender) -> None:
        try:
            contender.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            contender.process.kill()
            contender.process.wait()
            raise DemoFailed(f"{contender.identity} did not stop within {STOP_TIMEOUT:.0f} s") from None
        contender.state = "stopped"
        if contender.process.returncode != 0:
            raise DemoFailed(f"{contender.identity} exited with code {contender.process.returncode}")

    def kill_everyone(self) -> None:
        for contender in self.contenders.values():
            if contender.process.poll() is None:
                self._expected_exits.add(contender.identity)
                self._close_stdin(contender)
        end = time.monotonic() + STOP_TIMEOUT
        for contender in self.contenders.values():
            try:
                contender.process.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                contender.process.kill()
                contender.process.wait()

    def summary(self) -> bool:
        from crown_sync.testing import journal

        report = journal.check(self.journal_path, name=ELECTION)
        terms = report.terms
        journal_tokens = [t.token for t in terms]
        rising = all(
            a is not None and b is not None and b > a for a, b in zip(journal_tokens, journal_tokens[1:])
        )
        expected_terms = self.rounds + 1
        self.say()
        self.say("summary", bold=True)
        self.say(f"  rounds          {self.rounds}")
        times = ", ".join(f"{f * 1000:.1f} ms" for f in self.failovers)
        self.say(f"  failover times  {times}")
        self.say("                  (from the SIGKILL to the new leader's own claim, both on CLOCK_MONOTONIC)")
        if len(self.failovers) > 1:
            self.say(
                f"  failover median {statistics.median(self.failovers) * 1000:.1f} ms, "
                f"max {max(self.failovers) * 1000:.1f} ms"
            )
        token_text = " < ".join(str(t) for t in journal_tokens) if rising else ", ".join(map(str, journal_tokens))
        self.say(f"  tokens          {token_text}  ({'strictly rising' if rising else 'NOT rising'})")
        ok = report.ok and rising and len(terms) == expected_terms
        self.say(
            f"  journal check: {len(terms)} terms, {len(report.overlaps)} overlaps, "
            f"{len(report.token_violations)} token violations, "
            f"max leaderless gap {report.max_gap * 1000:.1f} ms",
            fg="green" if ok else "red",
        )
        if len(terms) != expected_terms:
            self.say(f"  expected {expected_terms} terms in the journal", fg="red")
        if not report.ok:
            self.say(report.summary(), fg="red")
        return ok

    def failure_details(self) -> None:
        for identity in self.order:
            path = self.contenders[identity].log_path
            try:
                with open(path, "r", encoding="utf-8", errors="replace") as handle:
                    tail = handle.read()[-1500:]
            except OSError:
                continue
            if tail.strip():
                click.echo(f"--- {identity} stderr ({path}) ---", err=True)
                click.echo(tail.rstrip(), err=True)


def run_demo(contenders: int = 3, rounds: int = 2, keep: bool = False) -> int:
    """Run the demo; returns the exit code (0 on success)."""
    if contenders < 2:
        raise ValueError(f"contenders must be >= 2, got {contenders}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    demo = Demo(contenders, rounds, keep)
    started = time.monotonic()
    code = 1
    try:
        demo.start()
        for number in range(1, rounds + 1):
            demo.round(number)
        demo.stop_all()
        code = 0 if demo.summary() else 1
        demo.say(f"  done in {time.monotonic() - started:.1f} s")
    except DemoFailed as exc:
        click.echo(click.style(f"demo failed: {exc}", fg="red"), err=True)
        demo.failure_details()
        demo.keep = True
    except KeyboardInterrupt:
        click.echo("\ninterrupted: stopping the contenders", err=True)
        code = 130
    finally:
        demo.kill_everyone()
        if demo.keep:
            click.echo(f"  files kept in {demo.tmpdir}", err=code != 0)
        else:
            shutil.rmtree(demo.tmpdir, ignore_errors=True)
    return code
