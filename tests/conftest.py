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
    if soft < 4096:
        # Fails (never skips) where the hard limit is too low to reproduce it.
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))
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
