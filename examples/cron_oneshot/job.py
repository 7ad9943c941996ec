r"""A cron job that must run once per period across the fleet, under ``crown-sync run``.

Every host's crontab runs the same line at the same time::

    0 3 * * *  crown-sync run nightly-report --oracle postgresql://app@db/app -- \
               python -m examples.cron_oneshot.job --period "$(date +\%F)" --state /srv/report-state

crown-sync makes the runs mutually exclusive: one host runs the command while the others wait.
But a host that waits gets the crown once the first one is done and would run it again, and a
host whose cron fired late would too. So the job records, *under the crown*, that the period is
done, and a later run of the same period exits at once. The record must live where every host
sees it (here a directory, for one host; in production the database the report writes to, in the
same transaction as the report, with the fencing token ``CROWN_SYNC_TOKEN`` so a stale leader's
late write is refused).

Journal (``--journal``): ``start``, ``beat`` while working, ``stop``; nothing when skipped.
"""

import argparse
import json
import os
import sys
import time

from crown_sync.testing.journal import Journal


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.cron_oneshot.job")
    parser.add_argument("--period", required=True, help="what this run is for, e.g. 2024-06-01")
    parser.add_argument("--state", required=True, help="where done periods are recorded")
    parser.add_argument("--journal", default=None)
    parser.add_argument("--work", type=float, default=1.0, help="seconds of pretend work")
    args = parser.parse_args(argv)

    name = os.environ["CROWN_SYNC_NAME"]  # refuse to run outside crown-sync
    identity = os.environ["CROWN_SYNC_IDENTITY"]
    token = int(os.environ["CROWN_SYNC_TOKEN"]) if os.environ.get("CROWN_SYNC_TOKEN") else None
    os.makedirs(args.state, exist_ok=True)
    marker = os.path.join(args.state, f"{args.period}.done")
    if os.path.exists(marker):
        with open(marker) as handle:
            print(f"{args.period}: already done ({handle.read().strip()})")
        return 0

    journal = Journal(args.journal) if args.journal else None
    if journal:
        journal.write("start", name, identity, token, period=args.period)
    end = time.monotonic() + args.work
    while time.monotonic() < end:  # the report
        time.sleep(0.02)
        if journal:
            journal.write("beat", name, identity, token)
    temporary = marker + f".{os.getpid()}.tmp"
    with open(temporary, "w") as handle:
        json.dump({"token": token, "identity": identity, "at": time.time()}, handle)
    os.replace(temporary, marker)  # done, atomically, before giving the crown up
    if journal:
        journal.write("stop", name, identity, token)
    print(f"{args.period}: done with token {token}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
