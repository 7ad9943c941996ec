"""A real network partition on one machine: a network namespace joined to the host by a veth pair.

``Netns.create()`` (root and iproute2's ``ip`` needed) makes a namespace ``csc<pid>x<n>`` and a
veth pair whose host end gets ``A.1/30`` and whose namespace end gets ``A.2/30``, where ``A`` is a
/30 picked at random from 10.213.0.0/16 and not already used on this host. Nothing is routed or
forwarded: the /30 exists only between this host's kernel and the namespace, so traffic never
leaves the machine. A server that should be reachable from the namespace listens on ``host_ip``
as well as on loopback; a contender started with :meth:`Netns.command` runs inside the namespace
and reaches the server only through the veth pair.

:meth:`cut` sets one end of the pair down (``ip link set ... down``) and :meth:`heal` sets it up
again. Which end matters to the client:

* ``"host"``: the host end goes down. The namespace keeps its address and route (marked
  ``linkdown``) and its packets vanish without any error: the client hears *silence*, the
  hardest case (it can only time out). The host's own address stays local and reachable.
* ``"netns"``: the namespace end goes down; its route goes away, so the client's sends fail at
  once with "network unreachable", while the server's packets vanish.

Namespaces left behind by a runner that was SIGKILLed are removed the next time one is created
(their names carry the pid of the process that made them).
"""

import ipaddress
import os
import random
import re
import shutil
import subprocess
import threading
from typing import List, Optional

__all__ = ["Netns", "NetnsUnavailable", "netns_problem"]

_PREFIX = "csc"
_counter = 0
_counter_lock = threading.Lock()


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no ``ip``, or the kernel refused)."""


def _ip_binary() -> Optional[str]:
    return shutil.which("ip") or next(
        (p for p in ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip") if os.access(p, os.X_OK)), None
    )


def netns_problem() -> Optional[str]:
    """Why namespaces can't be made here, or None if they probably can (checked by creating one)."""
    if os.geteuid() != 0:
        return "network partitions need root (ip netns add, veth pairs); this process is not root"
    if _ip_binary() is None:
        return "network partitions need iproute2's 'ip' command, which is not installed"
    return None


def _run(argv: List[str], check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
    if check and result.returncode != 0:
        raise NetnsUnavailable(f"{' '.join(argv)} failed ({result.returncode}): "
                               f"{result.stdout.decode(errors='replace').strip()}")
    return result


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(ip: str) -> None:
    """Delete namespaces and links of ours whose creating process is gone."""
    listing = _run([ip, "netns", "list"], check=False).stdout.decode(errors="replace")
    for match in re.finditer(rf"^({_PREFIX}(\d+)x\d+)\b", listing, re.M):
        if not _pid_alive(int(match.group(2))):
            _run([ip, "netns", "del", match.group(1)], check=False)
    links = _run([ip, "-o", "link", "show"], check=False).stdout.decode(errors="replace")
    for match in re.finditer(rf"^\d+: ({_PREFIX}(\d+)x\d+h)[@:]", links, re.M):
        if not _pid_alive(int(match.group(2))):
            _run([ip, "link", "del", match.group(1)], check=False)


def _used_networks(ip: str) -> List[ipaddress.IPv4Network]:
    out = _run([ip, "-o", "-4", "addr", "show"], check=False).stdout.decode(errors="replace")
    return [ipaddress.ip_interface(m).network for m in re.findall(r"inet (\S+)", out)]


class Netns:
    """One namespace and its veth pair. Use :meth:`create`; always :meth:`destroy` (or ``with``)."""

    def __init__(self, name: str, host_if: str, ns_if: str, network: ipaddress.IPv4Network, ip: str):
        self.name = name
        self.host_if = host_if
        self.ns_if = ns_if
        self.network = network
        self.host_ip = str(network.network_address + 1)
        self.ns_ip = str(network.network_address + 2)
        self._ip = ip
        self.cut_side: Optional[str] = None
        self.destroyed = False

    @classmethod
    def create(cls, rng: Optional[random.Random] = None) -> "Netns":
        problem = netns_problem()
        if problem:
            raise NetnsUnavailable(problem)
        ip = _ip_binary()
        _remove_stale(ip)
        global _counter
        with _counter_lock:
            _counter += 1
            number = _counter
        # Interface names are limited to 15 characters: csc<pid>x<n>h fits for any Linux pid.
        name = f"{_PREFIX}{os.getpid()}x{number}"
        rng = rng or random.Random()
        used = _used_networks(ip)
        for _ in range(200):
            network = ipaddress.ip_network(f"10.213.{rng.randrange(256)}.{rng.randrange(64) * 4}/30")
            if not any(network.overlaps(other) for other in used):
                break
        else:
            raise NetnsUnavailable("no free /30 in 10.213.0.0/16 for the veth pair")
        netns = cls(name, name + "h", name + "n", network, ip)
        try:
            _run([ip, "netns", "add", name])
            _run([ip, "link", "add", netns.host_if, "type", "veth", "peer", "name", netns.ns_if])
            _run([ip, "link", "set", netns.ns_if, "netns", name])
            _run([ip, "addr", "add", f"{netns.host_ip}/30", "dev", netns.host_if])
            _run([ip, "link", "set", netns.host_if, "up"])
            netns._in_ns([ip, "addr", "add", f"{netns.ns_ip}/30", "dev", netns.ns_if])
            netns._in_ns([ip, "link", "set", netns.ns_if, "up"])
            netns._in_ns([ip, "link", "set", "lo", "up"])
        except Exception:
            netns.destroy()
            raise
        return netns

    def _in_ns(self, argv: List[str], check: bool = True) -> subprocess.CompletedProcess:
        return _run([self._ip, "netns", "exec", self.name] + argv, check=check)

    def command(self, argv: List[str]) -> List[str]:
        """``argv`` run inside the namespace. ``ip netns exec`` execs it in place, so the pid of
        the process started with this command line is the pid of ``argv`` itself."""
        return [self._ip, "netns", "exec", self.name] + list(argv)

    def cut(self, side: str = "host") -> None:
        """Cut the link: ``side`` is "host" (the client hears silence) or "netns" (its sends fail)."""
        if side not in ("host", "netns"):
            raise ValueError(f"side must be 'host' or 'netns', got {side!r}")
        if side == "host":
            _run([self._ip, "link", "set", self.host_if, "down"])
        else:
            self._in_ns([self._ip, "link", "set", self.ns_if, "down"])
        self.cut_side = side

    def link_down(self, side: str) -> bool:
        """True if that end of the pair is down right now (read back from the kernel)."""
        argv = [self._ip, "-o", "link", "show", "dev", self.host_if if side == "host" else self.ns_if]
        result = _run(argv, check=False) if side == "host" else self._in_ns(argv, check=False)
        text = result.stdout.decode(errors="replace")
        flags = re.search(r"<([^>]*)>", text)
        return result.returncode == 0 and flags is not None and "UP" not in flags.group(1).split(",")

    def heal(self) -> None:
        if self.cut_side == "host":
            _run([self._ip, "link", "set", self.host_if, "up"])
        elif self.cut_side == "netns":
            self._in_ns([self._ip, "link", "set", self.ns_if, "up"])
        self.cut_side = None

    def destroy(self) -> None:
        """Remove the namespace and the pair (deleting either end deletes both). Idempotent."""
        if self.destroyed:
            return
        self.destroyed = True
        _run([self._ip, "netns", "del", self.name], check=False)
        _run([self._ip, "link", "del", self.host_if], check=False)

    def __enter__(self) -> "Netns":
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    def __repr__(self) -> str:
        return f"<Netns {self.name} host {self.host_ip} ns {self.ns_ip}>"
