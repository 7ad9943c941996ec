"""Shared by the ZooKeeper tests: ZooKeeper-side lookups (the Fleet and wait helper are
tests/oracles/support.py's). Which ensemble member a leader is connected to is found from the
servers themselves (the leader node's ``ephemeralOwner`` and each member's ``cons`` listing).
"""

from kazoo.client import KazooClient


def plain_client(hosts: str, **kwargs) -> KazooClient:
    client = KazooClient(hosts=hosts, **kwargs)
    client.start(timeout=30)
    return client


def leader_node(client: KazooClient, election: str):
    """(node name, stat) of the lowest node of ``election``, or (None, None)."""
    try:
        children = client.get_children(election)
    except Exception:
        return None, None
    queue = [c for c in children if c[-10:].isdigit()]  # not the contenders' guard nodes
    for child in sorted(queue, key=lambda c: int(c[-10:])):
        stat = client.exists(f"{election}/{child}")
        if stat is not None:
            return child, stat
    return None, None
