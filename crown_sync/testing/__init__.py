"""Helpers for testing crown_sync and code that uses it against real servers.

Not imported by ``crown_sync`` itself. ``journal`` records protected work and checks it;
``servers`` starts throwaway PostgreSQL, ZooKeeper and memcached processes on loopback.
"""
