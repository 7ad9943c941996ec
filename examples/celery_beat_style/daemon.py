"""A stand-in for ``celery beat`` (or any daemon that must run once in the fleet).

Run it under ``crown-sync run NAME --restart -- python -m examples.celery_beat_style.daemon``:
it runs only on the leading host, is restarted in place if it exits, is stopped (SIGTERM, then
SIGKILL after ``--grace``) when leadership is lost, and dies with crown-sync.

It journals ``start``, a ``beat`` every ``--interval`` seconds and ``stop`` (on SIGTERM), with the
term from crown-sync's environment (CROWN_SYNC_NAME, CROWN_SYNC_TOKEN, CROWN_SYNC_IDENTITY).
``--exit-after S`` makes it exit with code 1 after S seconds, to show ``--restart``.
"""

import argparse
import os
import signal
import sys
import tempfile
import time

from crown_sync.testing.journal import Journal


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.celery_beat_style.daemon")
    parser.add_argument("--journal", default=os.path.join(tempfile.gettempdir(), "beat-demo.journal"))
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument("--exit-after", type=float, default=None)
    args = parser.parse_args(argv)

    name = os.environ.get("CROWN_SYNC_NAME", "beat")
    identity = os.environ.get("CROWN_SYNC_IDENTITY", "unmanaged")
    token = int(os.environ["CROWN_SYNC_TOKEN"]) if os.environ.get("CROWN_SYNC_TOKEN") else None
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    journal = Journal(args.journal)
    journal.write("start", name, identity, token)
    started = time.monotonic()
    while not stopping:
        time.sleep(args.interval)
        if stopping:
            break
        journal.write("beat", name, identity, token)
        if args.exit_after is not None and time.monotonic() - started >= args.exit_after:
            journal.write("exit", name, identity, token)
            return 1  # "crashed": crown-sync --restart starts it again, same term
    journal.write("stop", name, identity, token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
