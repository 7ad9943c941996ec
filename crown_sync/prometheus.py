"""Prometheus metrics for every crown of the process (extra ``.[prometheus]``: prometheus_client).

::

    import crown_sync.prometheus
    crown_sync.prometheus.enable()          # once, before the crowns start

Metrics follow :mod:`crown_sync.telemetry` (the observation surface: every crown of the process,
whoever made it), labelled by election name. The series, and what each one means exactly, are
listed in ``docs/metrics.rst``; the names follow Kubernetes client-go's
``leader_election_master_status`` and Choria's ``choria_election_*`` metrics.

Under Gunicorn (or any pre-fork server) use prometheus_client's multiprocess mode: set
``PROMETHEUS_MULTIPROC_DIR`` to an empty directory before the server starts, put
``from crown_sync.prometheus import child_exit`` in ``gunicorn.conf.py`` (so that a dead worker's
gauges stop counting) and serve :func:`make_wsgi_app` (or :func:`scrape_registry`), which then
adds up every process's files. The gauges carry the multiprocess mode that keeps them true across
processes: ``livesum`` for "is leader" (how many live processes of this host lead: 0 or 1, more
would be an overlap), ``livemax`` for the token.
"""

import os
import threading
from typing import Dict, Optional, Tuple

from . import clock, telemetry

try:
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, multiprocess
    from prometheus_client import make_wsgi_app as _make_wsgi_app
except ImportError as exc:  # an optional extra: say which
    raise ImportError(f"crown_sync.prometheus needs prometheus_client: pip install 'crown_sync[prometheus]' "
                      f"({exc})") from exc

__all__ = ["Metrics", "enable", "disable", "scrape_registry", "make_wsgi_app", "child_exit", "TAKEOVER_BUCKETS"]

#: Seconds: from a few milliseconds (a local handoff) to minutes (a monitor_timeout, a lease).
TAKEOVER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# Term ends: "lost" carries refresh/oracle/deadline, "abdicated" stop/child_exited.
_TERM_ENDS = ("crown.leadership.lost", "crown.leadership.abdicated")
# Signs, before the crown abdicates, that its term is over (stop() ends it at once; the leader's
# child is stopped only at a term's end): "is leader" drops then, before a successor can start.
_OVER = ("crown.process.terminating", "crown.child.stopped")
_EVENTS = ("crown.leadership.", "crown.monitor.leader_down", "crown.oracle.error", "crown.process.stopped") + _OVER


class Metrics:
    """The crown_sync series in one registry, fed by telemetry once :meth:`attach` is called."""

    def __init__(self, registry: CollectorRegistry = REGISTRY, namespace: str = "crown_sync"):
        labels = ["election"]
        self.is_leader = Gauge("is_leader", "Terms this process holds now (1: it leads the election)",
                               labels, namespace=namespace, registry=registry, multiprocess_mode="livesum")
        self.token = Gauge("token", "Fencing token of the term this process holds; 0 when it holds none",
                           labels, namespace=namespace, registry=registry, multiprocess_mode="livemax")
        self.terms_won = Counter("terms_won", "Terms this process won", labels,
                                 namespace=namespace, registry=registry)
        self.terms_lost = Counter("terms_lost", "Terms that ended in this process, by reason",
                                  labels + ["reason"], namespace=namespace, registry=registry)
        self.campaigns = Counter("campaigns", "Claims answered by the oracle, by result (won, lost)",
                                 labels + ["result"], namespace=namespace, registry=registry)
        self.oracle_errors = Counter("oracle_errors", "Oracle calls that failed, by operation",
                                     labels + ["operation"], namespace=namespace, registry=registry)
        self.takeover = Histogram(
            "takeover_seconds", "From learning the leader was gone to leading, on the crown that took over",
            labels, namespace=namespace, registry=registry, buckets=TAKEOVER_BUCKETS)
        self._lock = threading.Lock()
        self._gone_at: Dict[Tuple[str, str], float] = {}  # per crown: when it learned the leader went
        self._tokens: Dict[Tuple[str, str], Optional[int]] = {}  # per crown leading now: its token
        self._open: set = set()  # crowns whose term began and whose end is not counted yet
        self._handle: Optional[int] = None

    def attach(self) -> "Metrics":
        """Start counting the events of every crown of the process. Idempotent."""
        if self._handle is None:
            self._handle = telemetry.attach(self.observe, prefixes=_EVENTS)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            telemetry.detach(self._handle)
            self._handle = None

    def observe(self, event: str, metadata: dict) -> None:
        """The telemetry handler: one event of one crown."""
        name, crown = metadata["name"], (metadata["name"], metadata["identity"])
        now = clock.monotonic()
        if event == "crown.leadership.claimed":
            self._term_began(name, crown, metadata["token"], now)
        elif event == "crown.leadership.refreshed":
            self._set_token(name, crown, metadata["token"])
        elif event in _OVER and metadata.get("kind", "leader") == "leader":
            self._not_leading(name, crown)
        elif event in _TERM_ENDS:
            self._not_leading(name, crown)
            with self._lock:
                counted = crown in self._open  # a term that began before enable() is not counted
                self._open.discard(crown)
            if counted:
                self.terms_lost.labels(name, metadata.get("reason") or "unknown").inc()
        elif event == "crown.leadership.rejected":
            self.campaigns.labels(name, "lost").inc()
            with self._lock:
                self._gone_at.pop(crown, None)  # someone else took over: not ours to time
        elif event == "crown.monitor.leader_down":
            with self._lock:
                self._gone_at.setdefault(crown, now)
        elif event == "crown.process.stopped":
            with self._lock:
                self._gone_at.pop(crown, None)  # stopped before it claimed: nothing left to time
        elif event == "crown.oracle.error":
            self.oracle_errors.labels(name, metadata.get("operation") or "unknown").inc()

    def _term_began(self, name: str, crown: Tuple[str, str], token: Optional[int], now: float) -> None:
        with self._lock:
            self._tokens[crown] = token
            self._open.add(crown)
            gone_at = self._gone_at.pop(crown, None)
        self.campaigns.labels(name, "won").inc()
        self.terms_won.labels(name).inc()
        self.is_leader.labels(name).inc()  # inc/dec, not set: two crowns of one election may share a process
        self._set_token(name, crown, token)
        if gone_at is not None:
            self.takeover.labels(name).observe(max(0.0, now - gone_at))

    def _not_leading(self, name: str, crown: Tuple[str, str]) -> None:
        with self._lock:
            if crown not in self._tokens:
                return  # already counted off, or a term that began before enable()
            del self._tokens[crown]
            latest = self._latest_token(name)
        self.is_leader.labels(name).dec()
        self.token.labels(name).set(latest)  # another crown of this process may still lead

    def _set_token(self, name: str, crown: Tuple[str, str], token: Optional[int]) -> None:
        with self._lock:
            if crown not in self._tokens or token is None:
                return
            self._tokens[crown] = token
            latest = self._latest_token(name)
        self.token.labels(name).set(latest)

    def _latest_token(self, name: str) -> int:
        return max((token for (election, _), token in self._tokens.items()
                    if election == name and token is not None), default=0)


_default: Optional[Metrics] = None
_default_lock = threading.Lock()


def enable(registry: Optional[CollectorRegistry] = None) -> Metrics:
    """Export the crown_sync series for every crown of this process; returns the :class:`Metrics`.

    Without ``registry``: prometheus_client's default registry, once per process (a second call
    returns the same object). With one: new metrics in that registry (detach them when done).
    """
    global _default
    if registry is not None:
        return Metrics(registry).attach()
    with _default_lock:
        if _default is None:
            _default = Metrics(REGISTRY)
        return _default.attach()


def disable() -> None:
    """Stop counting for the default registry (the series stay, with their last values)."""
    with _default_lock:
        if _default is not None:
            _default.detach()


def scrape_registry(registry: CollectorRegistry = REGISTRY) -> CollectorRegistry:
    """What a /metrics endpoint exposes: in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set),
    a registry that adds up every process's files; otherwise ``registry`` itself."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return registry
    merged = CollectorRegistry()
    multiprocess.MultiProcessCollector(merged)
    return merged


def make_wsgi_app(registry: CollectorRegistry = REGISTRY):
    """A WSGI app serving the metrics (every process's, in multiprocess mode). Gunicorn can serve
    it alone as ``crown_sync.prometheus:make_wsgi_app()``; or mount it beside your app."""
    return _make_wsgi_app(scrape_registry(registry))


def child_exit(server, worker) -> None:
    """Gunicorn's ``child_exit`` hook (runs in the master): a dead worker's live gauges are
    dropped, so it no longer counts as a leader. A no-op outside multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(worker.pid)
