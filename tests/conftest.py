import os
import sys

# Make the repository root importable so tests can share support modules (tests.oracles.*).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import pytest  # noqa: E402


@pytest.fixture
def fds_above_1023():
    """Make the next descriptors this process opens number above 1023, as in a process with many
    crowns: select() refuses such descriptors, so code that uses it fails there."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        # Where the hard limit is below 1102, opening the fillers fails: an error, never a skip.
        wanted = 2048 if hard == resource.RLIM_INFINITY else min(2048, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    fillers = []
    try:
        while True:
            fd = os.open(os.devnull, os.O_RDONLY)
            fillers.append(fd)
            if fd > 1100:
                break
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
