"""A contender process for tests, benchmarks and the chaos runner.

``python -m crown_sync.testing.contender --name N --oracle URL --journal PATH [--child KIND]``
runs one crown whose child journals its work (see :mod:`crown_sync.testing.journal`), until
SIGTERM or SIGINT, then stops the crown cleanly and exits 0. With ``--events PATH`` it also appends
every telemetry event as a JSON line (with ``crown_sync.clock.monotonic()`` as ``t``), so a test can see when
this process claimed or lost leadership without asking the oracle.
"""

import argparse
import json
import os
import signal
import sys
import threading


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crown_sync.testing.contender")
    parser.add_argument("--name", required=True)
    parser.add_argument("--oracle", default=None)
    parser.add_argument("--journal", required=True)
    parser.add_argument("--child", choices=["thread", "process", "command", "none"], default="thread")
    parser.add_argument("--interval", type=float, default=0.005, help="journal beat interval")
    parser.add_argument("--events", default=None, help="append telemetry events here")
    parser.add_argument("--identity", default=None)
    parser.add_argument("--monitor-delay", type=float, default=None)
    parser.add_argument("--grace", type=float, default=2.0)
    parser.add_argument("--stop-delay", type=float, default=0.0,
                        help="the child keeps working this long after being told to stop")
    parser.add_argument("--priority", type=int, default=None)
    parser.add_argument("--strategy", default=None,
                        help="first, oldest, priority, or module:function (a callable strategy)")
    parser.add_argument("--preempt-interval", type=float, default=None)
    args = parser.parse_args(argv)

    import crown_sync
    from crown_sync import clock, telemetry
    from crown_sync.testing import journal

    if args.events:
        fd = os.open(args.events, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

        def record(event, metadata):
            line = {"event": event, "t": clock.monotonic(), "pid": os.getpid()}
            line.update({k: v for k, v in metadata.items() if k in ("identity", "phase", "token", "reason", "notice")})
            os.write(fd, (json.dumps(line, default=str) + "\n").encode())

        telemetry.attach(record)

    if args.child == "thread":
        child = crown_sync.ThreadChild(
            journal.journaled_work, args=(args.journal, args.interval, args.stop_delay), grace=args.grace
        )
    elif args.child == "process":
        child = crown_sync.ProcessChild(
            journal.journaled_process, args=(args.journal, args.interval, args.stop_delay), grace=args.grace
        )
    elif args.child == "command":
        child = crown_sync.CommandChild(
            [sys.executable, "-m", "crown_sync.testing.journal", args.journal, str(args.interval),
             str(args.stop_delay)],
            grace=args.grace,
        )
    else:
        child = None

    options = {}
    if args.monitor_delay is not None:
        options["monitor_delay"] = args.monitor_delay
    for option in ("priority", "preempt_interval"):
        if getattr(args, option) is not None:
            options[option] = getattr(args, option)
    if args.strategy is not None:
        options["strategy"] = _strategy(args.strategy)
    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    crown = crown_sync.Crown(
        args.name, oracle=args.oracle, child=child, identity=args.identity, **options
    )
    crown.start()
    while not done.wait(0.5):
        pass
    crown.stop()
    return 0


def _strategy(text: str):
    """A strategy's name, or the callable ``module:function`` names."""
    if ":" not in text:
        return text
    import importlib
    module, function = text.split(":", 1)
    return getattr(importlib.import_module(module), function)


def last_identity(candidates):
    """A callable strategy for tests: the candidate whose identity sorts last wins."""
    return sorted(candidates, key=lambda c: c.identity, reverse=True)


if __name__ == "__main__":
    sys.exit(main())
