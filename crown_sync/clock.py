"""The one clock of every deadline: ``monotonic()`` reads CLOCK_BOOTTIME where Linux has it.

A lease runs on the oracle's server, which keeps counting while this host is suspended (a laptop
lid, a paused VM). CLOCK_MONOTONIC stops during a suspend, so a deadline on it would still lie
ahead when the host wakes long after the server gave the lease away. CLOCK_BOOTTIME counts the
suspended time too: a term whose deadline passed during a suspend is over the moment the host
wakes, for ``is_leader()``, ``stop_event``, the process child's kernel timer and the command's
supervisor alike. Like CLOCK_MONOTONIC it never jumps with the wall clock, and it is one clock
for every process on the host.

Every deadline in crown_sync (``Claim.deadline``, ``Term.deadline``) is a value of this clock:
compare them only with ``monotonic()``. Where CLOCK_BOOTTIME is missing (not Linux) this is
CLOCK_MONOTONIC, with the suspend caveat above. Waits with a timeout (``Event.wait``) still run
on CLOCK_MONOTONIC; that only delays a wake-up after a suspend, and every check that matters
reads this clock.
"""

from ._supervise import CLOCK_ID, monotonic

__all__ = ["CLOCK_ID", "monotonic"]
