"""crown_sync: exactly one process across the fleet runs this job.

A :class:`Crown` contends for a name through an oracle (ZooKeeper, PostgreSQL, memcached, or a
local file lock); the leader runs a supervised child while it holds the crown, with a fencing
token and a lease deadline so that no two terms overlap.
"""

from .api import dismiss, find_leader, is_leader, known_leaders, lead, status
from .api import Election, ListingUnsupported, list_elections
from .children import CommandChild, ProcessChild, ThreadChild
from .crown import PHASES, Crown, Status
from .oracle import Claim, Contender, Leader, Oracle
from .terms import Term, TermInfo
from .urls import oracle_from_url
from . import telemetry

__version__ = "0.1.0"  # the one place the version is written (setup.cfg, docs read it)

__all__ = [
    "Crown",
    "Status",
    "PHASES",
    "Leader",
    "Oracle",
    "Contender",
    "Claim",
    "Term",
    "TermInfo",
    "ThreadChild",
    "ProcessChild",
    "CommandChild",
    "lead",
    "is_leader",
    "status",
    "find_leader",
    "dismiss",
    "known_leaders",
    "list_elections", "Election", "ListingUnsupported",
    "oracle_from_url",
    "telemetry",
]
