"""`crown-sync demo`, run as a person would: real contender processes, a real SIGKILL."""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCRIPT = os.path.join(os.path.dirname(sys.executable), "crown-sync")
CLI = [_SCRIPT] if os.access(_SCRIPT, os.X_OK) else [sys.executable, "-m", "crown_sync"]

pytestmark = pytest.mark.timeout(240)


def run_demo(*args):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    env.pop("CROWN_SYNC_ORACLE", None)
    # The bound only guards against a hang; the demo itself takes a few seconds.
    return subprocess.run(CLI + ["demo", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)


def failovers(output):
    return [float(ms) for ms in re.findall(r"leads with token \d+\s+failover (\d+(?:\.\d+)?) ms", output)]


def test_demo_defaults():
    result = run_demo()
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "Traceback" not in out + result.stderr
    assert "\x1b[" not in out  # no colour codes when stdout is not a terminal
    # Two rounds: two takeovers, each with its measured failover time.
    assert len(failovers(out)) == 2, out
    assert out.count("SIGKILL (pid") == 2, out
    assert "journal check: 3 terms, 0 overlaps, 0 token violations" in out, out
    assert "strictly rising" in out, out
    tokens = [int(t) for t in re.findall(r"leads with token (\d+)", out)]
    assert tokens == sorted(set(tokens)) and len(tokens) == 3, out


def test_demo_more_rounds_than_contenders():
    # The killed leader is replaced each round, so rounds may outnumber contenders.
    result = run_demo("--contenders", "2", "--rounds", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(failovers(result.stdout)) == 3, result.stdout
    assert "journal check: 4 terms, 0 overlaps, 0 token violations" in result.stdout
