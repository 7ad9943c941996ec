"""Django signals for leadership changes of crowns running in this process.

::

    from django.dispatch import receiver
    from crown_sync.django.signals import elected, deposed, new_leader

    @receiver(elected)
    def on_elected(sender, name, token, **kwargs):
        logger.info("leading %s with token %s", name, token)

They are sent with ``sender=crown_sync.Crown`` (the class, as Django's own signals send a class),
from the crown's loop thread, through the crown's callbacks (:mod:`crown_sync.callbacks`): for the
app's own crown (``CROWN_SYNC["START"]``) automatically, and for any crown you create yourself if
you pass it :func:`callbacks`, e.g. ``crown_per_worker("scheduler", child=..., **callbacks("scheduler"))``.
A receiver that raises is logged (logger ``crown_sync.callbacks``) and the others still run.
Keep receivers short: they delay the crown's next step (never its deadline).
"""

import logging
from typing import Any, Callable, Dict

from django.dispatch import Signal

from ..crown import Crown, check_name

__all__ = ["elected", "deposed", "new_leader", "callbacks"]

logger = logging.getLogger("crown_sync.callbacks")

#: A term began in this process (``name``, ``token``, ``identity``, ``term``); its child runs.
elected = Signal()
#: That term ended: its child stopped, the crown abdicated (``name``, ``token``, ``identity``,
#: ``term``, ``reason``: "stop", "refresh", "oracle", "deadline" or "child_exited").
deposed = Signal()
#: The leader a crown in this process knows of changed (``name``, ``leader``: a
#: :class:`crown_sync.Leader`, possibly this process's crown, or None while none is known).
new_leader = Signal()


def _send(signal: Signal, **named: Any) -> None:
    # send_robust: one failing receiver must not keep the others from hearing of a term's end.
    for receiver, result in signal.send_robust(Crown, **named):
        if isinstance(result, Exception):
            logger.error("receiver %r of crown_sync.django.signals failed", receiver,
                         exc_info=(type(result), result, result.__traceback__))


def callbacks(name: str) -> Dict[str, Callable]:
    """``on_elected``, ``on_deposed`` and ``on_new_leader`` for a crown of ``name`` that send
    :data:`elected`, :data:`deposed` and :data:`new_leader`."""
    check_name(name)

    def on_elected(term) -> None:
        _send(elected, name=name, token=term.token, identity=term.identity, term=term)

    def on_deposed(term, reason: str) -> None:
        _send(deposed, name=name, token=term.token, identity=term.identity, term=term, reason=reason)

    def on_new_leader(leader) -> None:
        _send(new_leader, name=name, leader=leader)

    return {"on_elected": on_elected, "on_deposed": on_deposed, "on_new_leader": on_new_leader}
