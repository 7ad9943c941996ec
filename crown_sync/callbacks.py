"""Per-crown callbacks: what a program (or an integration) wants done when leadership changes.

The names come from the systems crown_sync was founded on: Kubernetes client-go's
``OnStartedLeading`` / ``OnStoppedLeading`` / ``OnNewLeader`` and Choria's ``OnWon`` / ``OnLost`` /
``OnCampaign``. Each is optional:

``on_elected(term)``
    A term began: this crown leads. Called after the term's child started, so the child never
    waits for a callback, and for every term, so that each ``on_elected`` is followed by one
    ``on_deposed`` (the term may already be over when a ``stop()`` came at once).
``on_deposed(term, reason)``
    The term ended, after its child stopped and the crown abdicated. ``reason`` is ``"stop"``
    (``Crown.stop()``), ``"refresh"`` (the oracle said the lease is gone, a dismissal included),
    ``"oracle"`` (the oracle reported the loss: a broken session, a deleted node), ``"deadline"``
    (the term's deadline passed before a renewal), ``"child_exited"`` (the child ended by itself
    and ``max_child_restarts`` was used up) or ``"preempted"`` (a contender that outranks this one
    joined: see :doc:`/ranking`).
``on_new_leader(leader)``
    The leader this crown knows of changed (another :class:`~crown_sync.Leader`, ourselves, or
    None when none is known, e.g. between a term's end and the next claim).
``on_campaign(status)``
    The crown is about to contend (claim), with its :class:`~crown_sync.Status` at that moment.

They run in the crown's loop thread, one at a time and in the order of the events: keep them
short (a slow callback delays the crown's next step, never the deadline, which the warden and
the children enforce on their own). An exception is logged (logger ``crown_sync.callbacks``)
and the crown goes on.

:meth:`Crown.add_callbacks <crown_sync.Crown.add_callbacks>` adds more of them to a crown after
its construction (an integration's, to a crown it did not make); they run after the earlier ones.
"""

import logging
import threading
from typing import Any, Callable, Dict, Optional, Tuple

__all__ = ["Callbacks", "NAMES"]

logger = logging.getLogger("crown_sync.callbacks")

NAMES = ("on_elected", "on_deposed", "on_new_leader", "on_campaign")


class Callbacks:
    """The callbacks of one crown, validated when given (a TypeError names the option).

    Several may be given per event (:meth:`add`): they are called in the order they were added.
    """

    def __init__(self, crown_name: str, **callbacks: Optional[Callable[..., Any]]):
        self.crown_name = crown_name
        self._sets: Tuple[Dict[str, Callable[..., Any]], ...] = ()
        self._lock = threading.Lock()  # two add() at once must not lose one
        self.add(**callbacks)

    def add(self, **callbacks: Optional[Callable[..., Any]]) -> None:
        """Add callbacks (None ones are ignored); safe from any thread, while the crown runs."""
        checked = {}
        for name, callback in callbacks.items():
            if name not in NAMES:
                raise TypeError(f"unknown callback {name!r}; the callbacks are {', '.join(NAMES)}")
            if callback is not None and not callable(callback):
                raise TypeError(f"{name} must be callable or None, not {type(callback).__name__}")
            if callback is not None:
                checked[name] = callback
        if checked:
            with self._lock:
                # A new tuple, never one changed in place: the loop thread may be iterating the old.
                self._sets = self._sets + (checked,)

    def call(self, name: str, *args: Any) -> None:
        """Call every callback ``name``; log what one raises, never let it reach the loop."""
        for callbacks in self._sets:
            callback = callbacks.get(name)
            if callback is None:
                continue
            try:
                callback(*args)
            except Exception:
                logger.exception("%s callback of crown %r failed", name, self.crown_name)
