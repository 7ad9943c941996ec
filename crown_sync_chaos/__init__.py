"""crown_sync_chaos: the fault-injection suite for crown_sync (not shipped with the package).

``python -m crown_sync_chaos --oracle file|postgres|zookeeper|memcached|all --rounds N
--seconds S [--soak]`` runs contender processes on each oracle, injects a randomized fault per
round (SIGKILL, SIGSTOP past the lease, server restart, session termination or expiry,
``flush_all``, a network partition through a network namespace) and checks the contenders' own
journal for overlapping terms and fencing-token order. See docs/chaos.rst.
"""

from .kinds import available_kinds
from .runner import Runner, run_oracle

__all__ = ["available_kinds", "Runner", "run_oracle"]
