"""The ``crown-sync`` command line (also ``python -m crown_sync``).

Commands: ``run`` (contend for an election and run a command while leading), ``status`` (who
leads), ``dismiss`` (make the leader step down) and ``demo`` (the main job on the embedded file
oracle). See ``docs/cli.rst`` for the full story.

Exit codes follow the conventions of ``timeout(1)``, ``env(1)`` and the shells:

* ``run``: the command's own exit code when it exits by itself; 128+N when it was killed by
  signal N; 126/127 when the command cannot be run / is not found; 125 when crown-sync itself
  fails (e.g. the oracle's client library is missing); 124 when ``--wait-timeout`` or
  ``--no-wait`` gave up before leadership was won. When ``run`` itself receives
  SIGTERM, SIGINT or SIGHUP it stops the command, abdicates, and then dies of that same signal
  (as ``timeout`` does), so a shell reports 128+N and a service manager sees a signal death.
* ``run`` says on stderr, without ``-v``, when the oracle starts failing and when it answers
  again (once per change), and, on a terminal, who leads while it waits.
* ``status`` and ``dismiss``: 0 when there was a leader, 1 when there was none, 3 when the oracle
  could not be asked (unreachable, or its client library is not installed).
* 2 for usage errors (bad name, bad or unknown oracle URL, bad option), as click does.

Nothing here prints a password: the oracle is shown by its ``description`` and every URL passes
through :func:`crown_sync.urls.redact`.
"""

import datetime
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
from typing import Any, Dict, List, Optional

import click

from .children import CommandChild

__all__ = ["main"]

#: Exit code of ``run`` when crown-sync itself fails (as ``env``/``timeout`` use 125).
EXIT_RUN_FAILED = 125
#: Exit codes of ``env``/``timeout``/the shells when the command cannot be started.
EXIT_CANNOT_RUN = 126
EXIT_NOT_FOUND = 127
#: Exit code of ``run --wait-timeout/--no-wait`` when leadership was not won in time (as
#: ``timeout(1)`` uses 124 for "timed out"; ``flock -w`` uses 1, which commands often use too).
EXIT_NOT_LEADING = 124

#: Signals that make ``run`` stop cleanly (command stopped first, then abdicate).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}

#: Exit code when the oracle cannot be asked (unreachable, broken, client library missing), so
#: that scripts can tell "no leader" (1) from "don't know" (3).
EXIT_ORACLE_ERROR = 3


class OracleError(click.ClickException):
    exit_code = EXIT_ORACLE_ERROR


def _check_name(ctx, param, value):
    from .crown import check_name

    if value is None:
        return value
    try:
        return check_name(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a valid election name: use 1-128 characters of A-Z a-z 0-9 . _ -"
        ) from None


def _secrets_in(url: Optional[str]) -> List[str]:
    """The literal secrets in ``url`` (password, secret-looking query values), longest first."""
    import urllib.parse

    from crown_sync import urls

    if not url or "://" not in url:
        return []
    found = []
    try:
        parts = urllib.parse.urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        if ":" in userinfo:
            found.append(userinfo.split(":", 1)[1])
        for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
            if urls._SECRET_PARAMS.search(key):
                found.append(value)
    except ValueError:
        pass
    variants = set()
    for secret in found:
        if secret:
            variants.update({secret, urllib.parse.unquote(secret)})
    return sorted(variants, key=len, reverse=True)


def _scrub(message: str, url: Optional[str]) -> str:
    """``message`` with URLs redacted and any secret of ``url`` replaced, wherever it appears:
    an oracle's error may quote a piece of the URL that redact() cannot recognise alone."""
    from crown_sync.urls import redact

    for secret in _secrets_in(url):
        message = message.replace(secret, "***")
    return re.sub(r"[A-Za-z][A-Za-z0-9+.-]*://\S+", lambda m: redact(m.group(0)), message)


def _open_oracle(url: Optional[str]):
    """The oracle for ``url``, or the default one (``$CROWN_SYNC_ORACLE``, else embedded file).

    Bad URLs are usage errors (exit code 2); a missing optional client library, or a default
    file oracle directory that cannot be created, is exit code 3.
    """
    from crown_sync import urls

    try:
        if url:
            return urls.oracle_from_url(url)
        return urls.default_oracle()
    except (ValueError, TypeError) as exc:
        message = _scrub(str(exc), url or urls.default_oracle_url())
        raise click.BadParameter(message, param_hint="'--oracle' / CROWN_SYNC_ORACLE") from None
    except (ImportError, OSError) as exc:
        raise OracleError(_scrub(str(exc), url or urls.default_oracle_url())) from None


def _oracle_label(oracle) -> str:
    from crown_sync.urls import redact

    description = getattr(oracle, "description", "") or type(oracle).__name__
    return redact(description)


def _close_quietly(oracle) -> None:
    try:
        oracle.close()
    except Exception:  # closing is best effort on the way out; the process ends anyway
        logging.getLogger("crown_sync.cli").debug("closing the oracle failed", exc_info=True)


def _setup_logging(verbose: int) -> None:
    """-v: crown events at INFO on stderr; -vv: everything at DEBUG."""
    if not verbose:
        return
    from crown_sync import telemetry

    level = logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")
    )
    root = logging.getLogger("crown_sync")
    root.addHandler(handler)
    root.setLevel(level)
    prefixes = None
    if verbose == 1:
        # A leader refreshes several times a second on some oracles: only -vv shows those.
        prefixes = [event for event in telemetry.EVENTS if event != "crown.leadership.refreshed"]
    telemetry.attach_default_logger(logging.INFO, prefixes=prefixes)


oracle_option = click.option(
    "--oracle",
    "oracle_url",
    metavar="URL",
    envvar="CROWN_SYNC_ORACLE",
    show_envvar=True,
    help="Oracle URL (file://, postgresql://, zookeeper://, memcached://). "
    "Default: $CROWN_SYNC_ORACLE, else the embedded file oracle in a private per-user directory.",
)

verbose_option = click.option(
    "-v", "--verbose", count=True,
    help="Log crown events to stderr (-vv: also every refresh, and debug logging).",
)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("crown_sync")
    except Exception:  # running from a source tree that is not installed
        import crown_sync

        return getattr(crown_sync, "__version__", "unknown")


def _print_version(ctx, param, value):
    if value and not ctx.resilient_parsing:
        click.echo(f"crown-sync {_version()}")
        ctx.exit(0)


@click.group(context_settings=CONTEXT_SETTINGS)
@click.option(
    "--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
    help="Show the version and exit.",
)
def main():
    """Exactly one process across the fleet runs this job: leader election with fencing tokens.

    \b
    crown-sync demo                         see an election, a crash and a takeover
    crown-sync run NAME -- COMMAND [ARGS]   run COMMAND only while leading NAME
    crown-sync status NAME                  who leads NAME
    crown-sync dismiss NAME                 make the leader of NAME step down
    """


# ---------------------------------------------------------------------------------------- run


def _parse_metadata(items) -> Dict[str, Any]:
    metadata: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="'--metadata'")
        metadata[key] = value
    return metadata


def _resolve_command(command: List[str]) -> List[str]:
    """Fail early, the way env(1) does, when the command cannot be run at all."""
    program = command[0]
    if os.sep in program:
        path = program
        if not os.path.exists(path):
            click.echo(f"crown-sync: {program}: no such file", err=True)
            sys.exit(EXIT_NOT_FOUND)
    else:
        path = shutil.which(program)
        if path is None:
            click.echo(f"crown-sync: {program}: command not found", err=True)
            sys.exit(EXIT_NOT_FOUND)
    if os.path.isdir(path) or not os.access(path, os.X_OK):
        click.echo(f"crown-sync: {program}: permission denied (not an executable file)", err=True)
        sys.exit(EXIT_CANNOT_RUN)
    return list(command)


def exit_status(exitcode: Optional[int]) -> int:
    """A subprocess return code as a shell would report it: N, or 128+N for signal N."""
    if exitcode is None:
        return 1
    if exitcode < 0:
        return 128 - exitcode
    return exitcode


@main.command(context_settings=CONTEXT_SETTINGS, short_help="Run COMMAND only while leading NAME.")
@click.argument("name", callback=_check_name)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@oracle_option
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    metavar="SECONDS",
    help="On loss of leadership the command gets SIGTERM, then SIGKILL after this long.",
)
@click.option(
    "--restart",
    is_flag=True,
    help="When the command exits by itself, keep leading and start it again "
    "(default: abdicate and exit with the command's exit code).",
)
@click.option(
    "--restart-delay",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    metavar="SECONDS",
    help="With --restart: pause before starting the command again.",
)
@click.option("--identity", default=None, help="Identity published while leading (default HOST:PID:RANDOM).")
@click.option(
    "--metadata",
    "-m",
    "metadata_items",
    multiple=True,
    metavar="KEY=VALUE",
    help="Metadata published with the leadership (repeatable); shown by 'status'.",
)
@click.option(
    "--wait-timeout",
    type=click.FloatRange(min=0),
    default=None,
    metavar="SECONDS",
    help=f"Give up (exit {EXIT_NOT_LEADING}) if leadership was not won within SECONDS "
    "(default: wait for it forever). Applies to the first term only.",
)
@click.option(
    "--no-wait",
    is_flag=True,
    help=f"Give up (exit {EXIT_NOT_LEADING}) as soon as the first claim is refused, e.g. "
    "another process leads (like flock -n).",
)
@click.option(
    "--priority",
    type=int,
    default=None,
    metavar="N",
    help="Prefer this contender over lower ones: an outranked leader hands over gracefully "
    "(implies --strategy priority).",
)
@click.option(
    "--strategy",
    type=click.Choice(["first", "oldest", "priority"]),
    default=None,
    help="Who leads among the live contenders (default: first; priority with --priority).",
)
@verbose_option
def run(name, command, oracle_url, grace, restart, restart_delay, identity, metadata_items,
        wait_timeout, no_wait, priority, strategy, verbose):
    """Contend for NAME and run COMMAND while leading it.

    \b
    On loss of leadership COMMAND is stopped (SIGTERM, SIGKILL after --grace) and
    crown-sync contends again. When COMMAND exits by itself, crown-sync abdicates and
    exits with COMMAND's exit code (128+N if killed by signal N), unless --restart.
    SIGTERM/SIGINT/SIGHUP: COMMAND is stopped, the leadership given up, then crown-sync
    dies of the same signal (the shell reports 128+N). Put COMMAND after '--'.
    With --wait-timeout/--no-wait, exit 124 if leadership was not won in time.

    COMMAND gets CROWN_SYNC_NAME, CROWN_SYNC_TOKEN (the fencing token) and
    CROWN_SYNC_IDENTITY in its environment.
    """
    metadata = _parse_metadata(metadata_items)
    argv = _resolve_command(list(command))
    _setup_logging(verbose)
    child = _RecordedCommand(argv, grace=grace)
    ranking = {"strategy": strategy or ("priority" if priority is not None else "first")}
    if priority is not None:
        ranking["priority"] = priority
    crown = _run_crown(name, oracle_url, child, restart, restart_delay, identity, metadata, ranking)
    watcher = _RunWatcher(crown, child, name, oracle_url, restart, no_wait)
    previous = {signum: signal.signal(signum, watcher.on_signal) for signum in STOP_SIGNALS}
    give_up_at = None if wait_timeout is None else time.monotonic() + wait_timeout
    try:
        crown.start()
        # Short waits so the signal handler gets to run promptly in the main thread.
        while not watcher.wake.wait(0.2):
            watcher.poll()
            if give_up_at is not None and time.monotonic() >= give_up_at:
                watcher.give_up(f"leadership of {name} not won within {wait_timeout:g} s")
    finally:
        # stop(): the command first (SIGTERM, SIGKILL after grace), then abdicate, then close.
        crown.stop()
        _close_quietly(crown.oracle)

    if watcher.received:
        _die_of(watcher.received[0])
    for signum, handler in previous.items():
        signal.signal(signum, handler)
    if watcher.gave_up:
        sys.exit(EXIT_NOT_LEADING)
    sys.exit(exit_status(watcher.exitcode))


def _run_crown(name, oracle_url, child, restart, restart_delay, identity, metadata, ranking):
    """The Crown that ``run`` drives; bad options are usage errors, a missing library is 125."""
    import crown_sync

    try:
        oracle = _open_oracle(oracle_url)
    except OracleError as exc:
        exc.exit_code = EXIT_RUN_FAILED  # 3 could be the command's own code: use env(1)'s 125
        raise
    options: Dict[str, Any] = dict(ranking)
    if restart:
        # Restart in place, without limit, within the same term (same fencing token).
        options.update(max_child_restarts=None, child_backoff=restart_delay)
    else:
        # On exit the engine abdicates and waits monitor_delay before contending again; we stop
        # the crown in that window (on_deposed, "child_exited"), so the command never reruns.
        options.update(max_child_restarts=0)
    try:
        return crown_sync.Crown(
            name,
            oracle=oracle,
            child=child,
            identity=identity,
            metadata=metadata or None,
            **options,
        )
    except (ValueError, TypeError) as exc:
        _close_quietly(oracle)
        raise click.UsageError(_scrub(str(exc), oracle_url)) from None


def _die_of(signum: int) -> None:
    """Die of the signal we got, as timeout(1) does: the shell sees 128+N and service managers
    see a signal death rather than an error exit."""
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
    os.kill(os.getpid(), signum)
    time.sleep(1.0)  # the signal is delivered before this returns; belt and braces below
    sys.exit(128 + signum)


class _RecordedCommand(CommandChild):
    """The command, keeping the last run it started: its exit code is ``run``'s own when the
    command ends by itself. (Set before the crown can hear of the exit: the crown holds its lock
    while it starts a child, and takes it to hear of an exit.)"""

    last_run = None

    def start(self, term, on_exit):
        self.last_run = None  # a start that raises leaves no earlier run's exit code behind
        run = self.last_run = super().start(term, on_exit)
        return run


class _RunWatcher:
    """What ``run`` learns from its crown's callbacks (the command's exit, whether it led, who
    leads) and from its status (the oracle's state, reported on stderr once per change: errors
    are otherwise logged at debug level only, and an unreachable oracle would look like a
    silent hang)."""

    def __init__(self, crown, child: _RecordedCommand, name: str, url: Optional[str], restart: bool,
                 no_wait: bool):
        self.crown, self.child, self.name, self.url = crown, child, name, url
        self.identity = crown.status().identity
        self.restart, self.no_wait = restart, no_wait
        self.wake = threading.Event()
        self.received: List[int] = []
        self.exitcode: Optional[int] = None
        self.led = self.gave_up = self.exited = False
        self.campaigns = 0
        self.oracle_failing = False
        self.noted: set = set()  # the crown's notices said so far
        self.shown_leader: Optional[str] = None
        self.terminal = sys.stderr.isatty()
        self.lock = threading.Lock()
        crown.add_callbacks(on_campaign=self.on_campaign, on_elected=self.on_elected,
                            on_deposed=self.on_deposed, on_new_leader=self.on_new_leader)

    def say(self, message: str) -> None:
        click.echo(f"crown-sync: {message}", err=True)

    def on_signal(self, signum, frame) -> None:
        if not self.received:
            self.received.append(signum)
        self.wake.set()

    def give_up(self, why: str) -> None:
        """Stop contending unless the crown already leads (then the command runs on)."""
        with self.lock:
            if self.led or self.gave_up:
                return
            self.gave_up = True
            # Ends a term the crown may be starting right now, before its command starts;
            # under the lock, so that a claim seen after this is never counted as led.
            self.crown.stop(timeout=0)
        self.say(f"{why}: giving up (exit {EXIT_NOT_LEADING})")
        self.wake.set()

    def poll(self) -> None:
        """From the main thread, every 0.2 s: the oracle's state; with --no-wait, a first claim
        refused without a leader named (the crown follows, or contends a second time)."""
        self.check_oracle()
        if self.no_wait and not self.led and (self.campaigns > 1 or self.crown.phase == "following"):
            leader = self.crown.leader()
            # A claim can also be refused while the oracle waits out a lease nobody holds now.
            why = f"is led by {leader.identity}" if leader else "was not won at once (no leader named yet)"
            self.give_up(f"{self.name} {why}")

    def on_campaign(self, status) -> None:
        self.campaigns += 1
        if self.no_wait and self.campaigns > 1:
            self.poll()  # at once: the second claim must not be made

    def on_elected(self, term) -> None:
        self.check_oracle()
        with self.lock:
            if not self.gave_up:
                self.led = True
        if self.terminal and not self.gave_up:
            self.say(f"leading {self.name} (token {term.token})")
        self.shown_leader = None

    def on_deposed(self, term, reason: str) -> None:
        if reason == "child_exited" and not self.restart and not self.exited:
            run = self.child.last_run  # None if the command could not be started: exit 1
            self.exitcode, self.exited = (run.exitcode if run is not None else None), True
            self.wake.set()

    def on_new_leader(self, leader) -> None:
        if leader is None or leader.identity == self.identity:
            return
        self.check_oracle()
        if self.no_wait and not self.led:
            self.give_up(f"{self.name} is led by {leader.identity}")
            return
        if self.terminal and leader.identity != self.shown_leader:
            self.shown_leader = leader.identity
            self.say(f"waiting: {self.name} is led by {leader.identity}")

    def check_oracle(self) -> None:
        """Say when the oracle starts failing and when it answers again (its crown's status), and
        each of its notices once."""
        status = self.crown.status()
        with self.lock:
            notes = [text for text in status.notices if text not in self.noted]
            self.noted.update(notes)
        for text in notes:
            self.say(f"note: {_scrub(text, self.url)}")
        error = status.last_error
        with self.lock:
            if (error is not None) == self.oracle_failing:
                return
            self.oracle_failing = error is not None
        label = _oracle_label(self.crown.oracle)
        if error is not None:
            error = " ".join(error.split())  # psycopg's messages span several lines
            self.say(f"{self.name}: oracle {label} failed, retrying: {_scrub(error, self.url)}")
        else:
            self.say(f"{self.name}: oracle {label} answers again")


# ------------------------------------------------------------------------------------- status


def _format_age(seconds: float) -> str:
    if seconds < 0:
        return "in the future (clocks differ)"
    if seconds < 60:
        return f"{seconds:.1f} s ago"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s ago"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min ago"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h ago"


def _iso(epoch: Optional[float]) -> Optional[str]:
    if epoch is None:
        return None
    moment = datetime.datetime.fromtimestamp(epoch, tz=datetime.timezone.utc)
    return moment.astimezone().isoformat(timespec="milliseconds")


def leader_as_dict(leader, now: Optional[float] = None) -> Optional[Dict[str, Any]]:
    """A Leader as the JSON ``status --json`` prints (None when there is no leader)."""
    if leader is None:
        return None
    now = time.time() if now is None else now
    return {
        "identity": leader.identity,
        "token": leader.token,
        "since": leader.since,
        "since_iso": _iso(leader.since),
        "age": None if leader.since is None else round(now - leader.since, 3),
        "metadata": dict(leader.metadata or {}),
    }


def _find_leader(name, oracle, url):
    import crown_sync

    try:
        return crown_sync.find_leader(name, oracle=oracle)
    except (ValueError, TypeError) as exc:
        raise click.UsageError(_scrub(str(exc), url)) from None
    except Exception as exc:  # the oracle is unreachable or broken: say so without a traceback
        raise OracleError(
            f"cannot read the leader of {name!r} from {_oracle_label(oracle)}: "
            f"{type(exc).__name__}: {_scrub(str(exc), url)}"
        ) from None


@main.command(context_settings=CONTEXT_SETTINGS, short_help="Print the current leader of NAME.")
@click.argument("name", callback=_check_name)
@oracle_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object (leader null if none).")
@verbose_option
def status(name, oracle_url, as_json, verbose):
    """Print the current leader of NAME, read from the oracle without contending.

    Exit code 0 if NAME has a leader, 1 if it has none, 3 if the oracle could not be asked.
    """
    _setup_logging(verbose)
    oracle = _open_oracle(oracle_url)
    try:
        leader = _find_leader(name, oracle, oracle_url)
    finally:
        _close_quietly(oracle)
    label = _oracle_label(oracle)
    notices = getattr(oracle, "notices", None)  # what the oracle cannot protect NAME against
    notices = [_scrub(text, oracle_url) for text in notices(name)] if callable(notices) else []
    for text in notices if not as_json else ():
        click.echo(f"note: {text}", err=True)
    if as_json:
        document = {"name": name, "oracle": label, "leader": leader_as_dict(leader), "notices": notices}
        click.echo(json.dumps(document, indent=2, sort_keys=True, default=str))
    elif leader is None:
        click.echo(f"no leader for {name}")
    else:
        rows = [("leader", leader.identity), ("token", "-" if leader.token is None else str(leader.token))]
        if leader.since is not None:
            rows.append(("since", f"{_iso(leader.since)} ({_format_age(time.time() - leader.since)})"))
        else:
            rows.append(("since", "unknown"))
        metadata = leader.metadata or {}
        rows.append(("metadata", json.dumps(metadata, sort_keys=True, default=str) if metadata else "-"))
        rows.append(("oracle", label))
        click.echo(f"{name}")
        for key, value in rows:
            click.echo(f"  {key:<9} {value}")
    sys.exit(0 if leader is not None else 1)


# ------------------------------------------------------------------------------------ dismiss


@main.command(context_settings=CONTEXT_SETTINGS, short_help="Make the leader of NAME step down.")
@click.argument("name", callback=_check_name)
@oracle_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object (dismissed null if none).")
@verbose_option
def dismiss(name, oracle_url, as_json, verbose):
    """Make the current leader of NAME step down (it stops its child; anyone may then lead).

    Exit code 0 if there was a leader to dismiss, 1 if there was none, 3 if the oracle could not
    be asked.
    """
    import crown_sync

    _setup_logging(verbose)
    oracle = _open_oracle(oracle_url)
    try:
        leader = _find_leader(name, oracle, oracle_url)
        try:
            dismissed = crown_sync.dismiss(name, oracle=oracle)
        except (ValueError, TypeError) as exc:
            raise click.UsageError(_scrub(str(exc), oracle_url)) from None
        except Exception as exc:
            raise OracleError(
                f"cannot dismiss the leader of {name!r} on {_oracle_label(oracle)}: "
                f"{type(exc).__name__}: {_scrub(str(exc), oracle_url)}"
            ) from None
    finally:
        _close_quietly(oracle)
    if dismissed is None:  # an API that returns nothing: judge by whether someone led
        dismissed = leader is not None
    if as_json:
        # The leader read just before the dismissal; "dismissed": null when there was none.
        shown = leader_as_dict(leader) if dismissed and leader is not None else None
        if dismissed and shown is None:
            shown = {"identity": None, "token": None}
        document = {"name": name, "oracle": _oracle_label(oracle), "dismissed": shown}
        click.echo(json.dumps(document, indent=2, sort_keys=True, default=str))
    elif not dismissed:
        click.echo(f"no leader for {name}")
    elif leader is not None:
        token = "" if leader.token is None else f" (token {leader.token})"
        click.echo(f"dismissed {leader.identity}{token} from {name}")
    else:
        click.echo(f"dismissed the leader of {name}")
    sys.exit(0 if dismissed else 1)


# --------------------------------------------------------------------------------------- list


def _election_rows(elections) -> List[List[str]]:
    rows = [["NAME", "LEADER", "TOKEN", "SINCE", "CONTENDERS", "METADATA"]]
    for election in elections:
        leader = election.leader
        contenders = "?" if election.contenders is None else str(election.contenders)  # can't tell
        if leader is None:
            rows.append([election.name, "-", "-", "-", contenders, "-"])
            continue
        since = "-" if leader.since is None else _format_age(time.time() - leader.since)
        metadata = json.dumps(leader.metadata, sort_keys=True, default=str) if leader.metadata else "-"
        token = "-" if leader.token is None else str(leader.token)
        rows.append([election.name, leader.identity, token, since, contenders, metadata])
    return rows


@main.command("list", context_settings=CONTEXT_SETTINGS, short_help="List every election on the oracle.")
@oracle_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object, an entry per election.")
@verbose_option
def list_command(oracle_url, as_json, verbose):
    """List every election on the oracle with its leader, token, since, metadata and (where the
    oracle can tell: ZooKeeper, PostgreSQL) its number of contenders, the leader included.

    Exit code 0 when listed (even if empty), 3 if the oracle could not be asked or cannot list.
    """
    import crown_sync

    _setup_logging(verbose)
    oracle = _open_oracle(oracle_url)
    try:
        elections = crown_sync.list_elections(oracle)
    except Exception as exc:  # unreachable, broken, or unable to list: say so without a traceback
        raise OracleError(
            f"cannot list the elections on {_oracle_label(oracle)}: "
            f"{type(exc).__name__}: {_scrub(str(exc), oracle_url)}"
        ) from None
    finally:
        _close_quietly(oracle)
    label = _oracle_label(oracle)
    if as_json:
        entries = [{"name": election.name, "leader": leader_as_dict(election.leader),
                    "contenders": election.contenders} for election in elections]
        click.echo(json.dumps({"oracle": label, "elections": entries}, indent=2, sort_keys=True, default=str))
        return
    if not elections:
        click.echo(f"no elections on {label}")
        return
    rows = _election_rows(elections)
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])


# --------------------------------------------------------------------------------------- demo


@main.command(context_settings=CONTEXT_SETTINGS, short_help="Watch an election, a crash and a takeover.")
@click.option(
    "--contenders", "-n", type=click.IntRange(2, 16), default=3, show_default=True,
    help="Contender processes (the killed leader is replaced, so there are always this many).",
)
@click.option(
    "--rounds", "-r", type=click.IntRange(1, 20), default=2, show_default=True,
    help="How many times the leader is killed.",
)
@click.option("--keep", is_flag=True, help="Keep the demo's temporary directory (journal, logs).")
def demo(contenders, rounds, keep):
    """The main job: contenders on this host elect a leader, the leader is SIGKILLed,
    another takes over; prints who leads, the tokens and the failover times.

    Runs on the embedded file oracle in a fresh private temporary directory and checks the
    work journal afterwards: no two terms overlapped and tokens strictly rose.
    """
    from crown_sync import demo as demo_module

    sys.exit(demo_module.run_demo(contenders=contenders, rounds=rounds, keep=keep))


@main.command("demo-contender", hidden=True, context_settings=CONTEXT_SETTINGS)
@click.option("--name", required=True, callback=_check_name)
@click.option("--identity", required=True)
@click.option("--oracle", "oracle_url", required=True)
@click.option("--journal", "journal_path", required=True)
@click.option("--tick", type=float, default=0.2)
def demo_contender(name, identity, oracle_url, journal_path, tick):
    """One contender process of 'crown-sync demo' (internal)."""
    from crown_sync import demo as demo_module

    sys.exit(demo_module.contender_main(name, identity, oracle_url, journal_path, tick))


if __name__ == "__main__":  # pragma: no cover - use python -m crown_sync
    main()
