"""The bounded CI run of the fault-injection suite (crown_sync_chaos), one test per oracle.

Each test starts the oracle's real server and three real contender processes
(``python -m crown_sync.testing.contender`` with a journaling process child), then injects every
fault the oracle supports once, then two more, in an order drawn from a printed seed: SIGKILL of the leader,
SIGSTOP past the lease then SIGCONT, a graceful dismissal, and where they apply a server restart,
``pg_terminate_backend``, a real ZooKeeper session expiry, memcached ``flush_all`` and a network
partition (a contender in its own network namespace whose veth link is cut and healed).

The verdict comes only from the journal the children wrote (``crown_sync.testing.journal.check``):
no overlapping terms, fencing tokens rising from term to term. The tests also check that every
fault was seen to take effect, that faults which must end a term were followed by a new term,
that a partition really cut off the leader, and that no contender died by itself. Every oracle
has its test: one whose client library does not import fails (nothing is skipped).

A second test per oracle runs one round of each newer fault (a whole-group SIGSTOP, a server
restart while the leader's crown process is paused, the oracle's own revocation of a live
leader, and on PostgreSQL a failover to a standby while the leader's crown process is paused) with children that take 1.5 s to honour SIGTERM (grace 2 s), process, command and thread
children by contender.

Set ``CROWN_SYNC_CHAOS_SEED`` to replay a run. Network namespaces need root and ``ip``: without
them the partition fault is left out with a loud warning, and under ``CI=true`` that is a failure.
"""

import importlib
import json
import os
import random
import subprocess
import sys
import warnings

import pytest

from crown_sync_chaos.kinds import KINDS as ALL_KINDS, Kind
from crown_sync_chaos.netns import netns_problem
from crown_sync_chaos.runner import ROOT, Runner, kind_faults

#: Every oracle, whether or not its client library imports here: a missing one fails its test.
KINDS = {kind.name: kind for kind in ALL_KINDS}
IN_CI = os.environ.get("CI", "").lower() == "true"
#: Rounds after every fault has had its turn (drawn from a second shuffled cycle).
EXTRA_ROUNDS = 2
#: The newer faults, run with slow-to-stop children (where the kind supports them).
NEW_FAULTS = ("groupstop", "pause-restart", "revoke", "pause-promote")
#: A daemon slow to honour SIGTERM: it works this long after it, within GRACE.
STOP_DELAY, GRACE = 1.5, 2.0


def _seed() -> int:
    value = os.environ.get("CROWN_SYNC_CHAOS_SEED")
    return int(value) if value else random.SystemRandom().randrange(2 ** 32)


def _kind(name):
    kind = KINDS[name]
    for module in kind.modules:
        importlib.import_module(module)  # ImportError: the oracle's client library is missing
    return kind


def _run(kind, tmp_path, faults, rounds, **options):
    seed = _seed()
    print(f"{kind.name}: seed {seed} (CROWN_SYNC_CHAOS_SEED={seed} replays it)")
    result = Runner(
        kind,
        contenders=3,
        rounds=rounds,
        seed=seed,
        lease=2.0,
        workdir=str(tmp_path),
        require_partition=IN_CI,
        faults=faults,
        log=lambda text: print(text, flush=True),
        **options,
    ).run()
    context = f"seed {seed}; journal {result['journals']}; rounds {json.dumps(result['records'], default=str)}"

    # Safety, from the journal only.
    assert result["overlaps"] == 0, "\n".join(result["violations_text"]) + "\n" + context
    assert result["token_violations"] == 0, "\n".join(result["violations_text"]) + "\n" + context

    # Every fault happened (each at least once) and was seen to take effect.
    assert sorted(result["faults"]) == sorted(faults), context
    assert sum(result["faults"].values()) == rounds, context
    assert result["unconfirmed"] == [], context
    return result, context


def _terms_changed(result, context):
    """Terms really happened: one before the faults, and a new one after every fault that must
    end a term; nobody stalled and no contender died by itself."""
    must_end = sum(1 for r in result["records"] if r.get("expects_new_term"))
    assert result["terms"] >= 1 + must_end, context
    assert result["missing_new_terms"] == [], context
    assert result["stalled"] == [], context
    assert result["unexpected_exits"] == [], context


@pytest.mark.timeout(420)
@pytest.mark.parametrize("name", list(KINDS))
def test_fault_rounds_leave_no_overlap(name, tmp_path):
    kind = _kind(name)
    problem = netns_problem() if kind.partitionable else None
    if problem:
        message = f"{name}: NO NETWORK PARTITION in this run: {problem}"
        assert not IN_CI, message + " (CI=true: network namespaces are required)"
        warnings.warn(message)
    # The kind's own faults (the newer generic ones have their own test below).
    faults = [f for f in kind.faults if not (f == "partition" and problem)]
    result, context = _run(kind, tmp_path, faults, len(faults) + EXTRA_ROUNDS, child="process")
    if "partition" in faults:
        assert result["partition"].startswith("yes"), result["partition"]
        assert result["leader_partitions"] >= 1, context
    _terms_changed(result, context)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(KINDS))
def test_newer_fault_rounds_with_children_slow_to_stop_leave_no_overlap(name, tmp_path):
    # One round of each: a whole-group SIGSTOP, a server restart while the leader's crown process
    # is paused, the oracle's own revocation, a failover while the leader's crown process is paused
    # (PostgreSQL); every child takes 1.5 s to honour SIGTERM.
    kind = _kind(name)
    faults = [f for f in NEW_FAULTS if f in kind_faults(kind)]
    result, context = _run(kind, tmp_path, faults, len(faults), child="mixed", stop_delay=STOP_DELAY,
                           grace=GRACE)
    assert (result["stop_delay"], result["grace"]) == (STOP_DELAY, GRACE)
    _terms_changed(result, context)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("child", ["process", "command", "thread"])
def test_a_whole_group_sigstop_with_each_child_kind_leaves_no_overlap(child, tmp_path):
    # Above, which child kind leads a round is chance; here each kind is paused with its whole
    # process group (as Ctrl-Z does) once, on the memcached oracle (a lease on the contenders'
    # own clocks), with the child 1.5 s slow to honour SIGTERM.
    kind = _kind("memcached")
    result, context = _run(kind, tmp_path, ["groupstop"], 1, child=child, stop_delay=STOP_DELAY, grace=GRACE)
    assert [r["child"] for r in result["records"]] == [child], context
    _terms_changed(result, context)


@pytest.mark.parametrize("options, words", [
    ({"stop_delay": -1}, ["stop_delay"]),
    ({"stop_delay": "1"}, ["stop_delay"]),
    ({"grace": 0}, ["grace"]),
    ({"faults": ["revoke"]}, ["revoke", "groupstop"]),  # a kind that lists no revocation
    ({"faults": ["pause-restart"]}, ["pause-restart"]),  # nor a server to restart
])
def test_bad_runner_options_are_value_errors_naming_them(options, words):
    class Bare(Kind):  # the base class's faults only (nothing is started: construction fails)
        name = "bare"

    with pytest.raises(ValueError) as info:
        Runner(Bare, rounds=1, **options)
    for word in words:
        assert word in str(info.value)


@pytest.mark.timeout(180)
def test_command_line_prints_the_table(tmp_path):
    """The runner's command line on the file oracle: exit 0, a summary row, JSON results."""
    output = tmp_path / "results.json"
    env = dict(os.environ, PYTHONPATH=ROOT)
    run = subprocess.run(
        [sys.executable, "-m", "crown_sync_chaos", "--oracle", "file", "--rounds", "5",
         "--seed", "7", "--workdir", str(tmp_path / "work"), "--output", str(output),
         "--child", "mixed", "--stop-delay", "0.5"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=170,
    )
    text = run.stdout.decode(errors="replace")
    assert run.returncode == 0, text
    assert "seed 7" in text
    row = next(line for line in text.splitlines() if line.startswith("| file |"))
    assert "| 5 |" in row, row
    results = json.loads(output.read_text())["results"]
    assert [r["oracle"] for r in results] == ["file"]
    assert results[0]["rounds"] == 5 and results[0]["overlaps"] == 0
    assert sorted(results[0]["faults"]) == ["dismiss", "groupstop", "revoke", "sigkill", "sigstop"]
    assert (results[0]["child"], results[0]["stop_delay"]) == ("mixed", 0.5)
