"""An independent journal of protected work, and a Jepsen-style checker for it.

The work itself (a crown's child) appends one JSON line per event to a shared file: ``start``,
``beat`` every few milliseconds while it works, ``stop``; each with the election name, the term's
identity and token, the pid and :func:`crown_sync.clock.monotonic` (one clock for every process on
a Linux host, and the clock of the terms' deadlines, so a line can be compared with them). Lines are short and written with one ``write()`` to an ``O_APPEND``
descriptor, so lines from concurrent processes never interleave.

The checker reads only this journal, never the oracle's word. A term's activity spans from its
first line to its last (a SIGKILLed term has no ``stop``: its last beat is the last thing it did).
It reports terms whose activity overlaps another's, tokens that do not rise from one term to the
next, and the longest leaderless gap.
"""

import dataclasses
import json
import os
import sys
import time
from typing import Iterable, List, Optional, Tuple

from crown_sync.clock import monotonic

__all__ = ["Journal", "Term", "Report", "read", "check", "journaled_work", "journaled_process"]


class Journal:
    """Appends events to a journal file. Safe to share between processes."""

    def __init__(self, path: str):
        self.path = str(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def write(self, event: str, name: str, identity: str, token: Optional[int], **extra) -> None:
        record = {
            "ev": event,
            "name": name,
            "id": identity,
            "token": token,
            "pid": os.getpid(),
            "t": monotonic(),
        }
        record.update(extra)
        os.write(self._fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def journaled_work(term, path: str, interval: float = 0.005, stop_delay: float = 0.0) -> None:
    """A thread child: journal start, a beat every ``interval`` while the term lasts, stop.

    Use as ``child=crown_sync.ThreadChild(journaled_work, args=(path,))``. With ``stop_delay``
    it winds down like a real job: it keeps beating that long after ``stop_event`` is set by the
    end of the term, though never past the term's deadline (a thread can only be trusted to
    honour that).
    """
    journal = Journal(path)
    try:
        journal.write("start", term.name, term.identity, term.token)
        while not term.stop_event.wait(interval):
            journal.write("beat", term.name, term.identity, term.token)
        wind_down = monotonic() + stop_delay
        while monotonic() < wind_down and not term.expired:
            time.sleep(interval)
            if term.expired:
                break
            journal.write("beat", term.name, term.identity, term.token)
        if term.deadline is None or monotonic() < term.deadline:
            # Stopped in time. Past the deadline (e.g. resumed after SIGSTOP) the work stopped
            # acting at the deadline; a "stop" line written now would be an act outside the term.
            journal.write("stop", term.name, term.identity, term.token)
    finally:
        journal.close()


def _beat_until_sigterm(path: str, name: str, identity: str, token: Optional[int], interval: float,
                        stop_delay: float) -> None:
    """Journal start, beats until SIGTERM, ``stop_delay`` seconds more beats (a daemon that takes
    that long to honour SIGTERM, the normal case), then stop. SIGKILL ends it anywhere."""
    import signal

    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(monotonic()))
    journal = Journal(path)
    journal.write("start", name, identity, token)
    while not stopping or monotonic() < stopping[0] + stop_delay:
        time.sleep(interval)
        if stopping and monotonic() >= stopping[0] + stop_delay:
            break
        journal.write("beat", name, identity, token)
    journal.write("stop", name, identity, token)
    journal.close()


def journaled_process(term_info, path: str, interval: float = 0.005, stop_delay: float = 0.0) -> None:
    """A ProcessChild target: beats until SIGTERM (then ``stop_delay`` more) or SIGKILL."""
    _beat_until_sigterm(path, term_info.name, term_info.identity, term_info.token, interval, stop_delay)


def _command_main(argv: List[str]) -> int:
    """``python -m crown_sync.testing.journal PATH [INTERVAL [STOP_DELAY]]``: a CommandChild that
    journals, reading its term from the CROWN_SYNC_* environment."""
    path = argv[0]
    interval = float(argv[1]) if len(argv) > 1 else 0.005
    stop_delay = float(argv[2]) if len(argv) > 2 else 0.0
    token_text = os.environ.get("CROWN_SYNC_TOKEN", "")
    _beat_until_sigterm(path, os.environ["CROWN_SYNC_NAME"], os.environ["CROWN_SYNC_IDENTITY"],
                        int(token_text) if token_text else None, interval, stop_delay)
    return 0


@dataclasses.dataclass
class Term:
    name: str
    identity: str
    token: Optional[int]
    pid: int
    start: float
    end: float
    beats: int = 0
    stopped: bool = False


@dataclasses.dataclass
class Report:
    terms: List[Term]
    overlaps: List[Tuple[Term, Term]]
    token_violations: List[Tuple[Term, Term]]
    max_gap: float

    @property
    def ok(self) -> bool:
        return not self.overlaps and not self.token_violations

    def summary(self) -> str:
        lines = [
            f"{len(self.terms)} terms, {len(self.overlaps)} overlaps, "
            f"{len(self.token_violations)} token violations, max gap {self.max_gap * 1000:.1f} ms"
        ]
        for a, b in self.overlaps[:10]:
            lines.append(
                f"  OVERLAP: {a.identity} token {a.token} [{a.start:.4f}..{a.end:.4f}] with "
                f"{b.identity} token {b.token} [{b.start:.4f}..{b.end:.4f}]"
            )
        for a, b in self.token_violations[:10]:
            lines.append(f"  TOKEN: {a.token} ({a.identity}) then {b.token} ({b.identity})")
        return "\n".join(lines)


def read(path: str) -> List[dict]:
    """Every complete line of the journal. A last line without its newline is a write still
    under way (a line that crosses a page boundary becomes visible one page at a time, since a
    reader does not wait for a writer): it is left for the next read."""
    events = []
    with open(path, "r", encoding="utf-8") as handle:
        for line in handle:
            if not line.endswith("\n"):
                break  # only the last line can lack it
            line = line.strip()
            if line:
                events.append(json.loads(line))
    return events


def _terms(events: Iterable[dict], name: Optional[str]) -> List[Term]:
    terms = {}
    for event in sorted(events, key=lambda e: e["t"]):
        if name is not None and event["name"] != name:
            continue
        key = (event["name"], event["id"], event["token"], event["pid"])
        term = terms.get(key)
        if term is None:
            term = terms[key] = Term(
                event["name"], event["id"], event["token"], event["pid"], event["t"], event["t"]
            )
        term.end = max(term.end, event["t"])
        term.start = min(term.start, event["t"])
        if event["ev"] == "beat":
            term.beats += 1
        elif event["ev"] == "stop":
            term.stopped = True
    return sorted(terms.values(), key=lambda t: t.start)


def check(source, name: Optional[str] = None) -> Report:
    """Check a journal (a path or a list of events) for one election (or all if name is None)."""
    events = read(source) if isinstance(source, (str, os.PathLike)) else list(source)
    terms = _terms(events, name)
    overlaps = []
    for i, earlier in enumerate(terms):
        for later in terms[i + 1:]:
            if later.name == earlier.name and later.start <= earlier.end:
                overlaps.append((earlier, later))
    violations = []
    max_gap = 0.0
    by_name = {}
    for term in terms:
        by_name.setdefault(term.name, []).append(term)
    for series in by_name.values():
        for earlier, later in zip(series, series[1:]):
            if earlier.token is None or later.token is None or later.token <= earlier.token:
                violations.append((earlier, later))
            max_gap = max(max_gap, later.start - earlier.end)
    return Report(terms, overlaps, violations, max_gap)


if __name__ == "__main__":
    sys.exit(_command_main(sys.argv[1:]))
