"""Children: the work a crown runs while it holds a term, and how that work is stopped.

Three kinds, all started by the crown's loop thread with ``child.start(term, on_exit)``:

:class:`ThreadChild`
    ``target(term, *args, **kwargs)`` in a daemon thread. Stopping is cooperative: the term's
    ``stop_event`` is set when the term ends and *reads* as set once the deadline has passed, even
    if no crown thread has run since (see :mod:`crown_sync.terms`). A thread cannot be killed:
    if the target ignores the event, ``stop()`` gives up after ``grace``, logs a warning and the
    thread keeps running.
:class:`ProcessChild`
    ``target(term_info, *args, **kwargs)`` in a :mod:`multiprocessing` process. Stopped by
    SIGTERM, then SIGKILL after ``grace``, then reaped.
:class:`CommandChild`
    A command run under a small single-threaded supervisor process (:mod:`crown_sync._supervise`)
    that signals the command's whole process group: SIGTERM, then SIGKILL after ``grace``.

What is guaranteed (Linux):

* **Parent death.** Process and command children never outlive the crown's process, even if it
  is SIGKILLed: each arms the kernel's parent-death signal (``prctl(PR_SET_PDEATHSIG, SIGKILL)``)
  as the first thing it does, then checks that its parent is still the expected process (the
  parent may have died before the signal was armed). The kernel sends that signal when the parent
  *thread* that forked the child exits, which is why the crown always starts children from its
  long-lived loop thread; a caller of ``start()`` must do the same.
* **Deadline.** The term's deadline (a :func:`crown_sync.clock.monotonic` value, moved forward by
  ``extend()``) lives in shared memory that the parent writes and the child side reads, so a
  process or command child stops acting by the deadline even while the crown's process is paused
  (SIGSTOP, swap, a long GC) and cannot tell it to stop. A ProcessChild has a watchdog thread that
  re-reads the deadline (every 50 ms at most, and again just before it falls) and re-arms a POSIX
  timer (``timer_create(CLOCK_MONOTONIC)`` delivering SIGKILL at the absolute deadline), so the
  kernel kills it on time even if the target holds the GIL in a long C call. A CommandChild's
  supervisor, in a session of its own (a stop of the crown's whole process group leaves it
  running), polls the deadline and SIGKILLs the command's process group when it passes, within a
  scheduling delay of it; if the supervisor is stopped itself, its own kernel timer SIGKILLs it at
  the deadline and the command dies with it (parent-death signal).
* **Stop.** ``stop()`` returns once the child is really gone (reaped), after at most ``grace``
  plus a small margin; then SIGKILL. It is idempotent and callable from any thread.
* **on_exit** is called exactly once per started child, from a background thread (a thread
  child's own thread), after the child ended for any reason and its ``exitcode`` is set.

What is NOT guaranteed:

* A thread child that ignores ``term.stop_event`` keeps running after its term (threads cannot be
  killed). Check the event before every action that needs leadership.
* A paused *child* cannot act on anything, and work already under way (a request in flight, a
  write the kernel has queued) can land after the deadline: the **fencing token**
  (``term.token``, strictly rising between terms) is the last line of defence. Pass it to the
  systems you write to and have them reject lower tokens.
* A deadline extension that reaches the child in the last few milliseconds before the old
  deadline may come too late: the child is killed (the safe side).
* Processes that a ProcessChild target starts are not signalled by the crown; processes a command
  starts outside its process group escape the group signals; if the supervisor is SIGKILLed (its
  timer included), the kernel kills the command itself, and the rest of its group is killed
  only when the crown's reaper thread runs (it finds the supervisor dead without a report).
* With ``start_method="forkserver"`` the child's parent is the fork server, so the parent-death
  signal fires when the fork server exits (which it does when the crown's process dies, unless
  some other process still holds its "alive" pipe): weaker than with "fork" or "spawn" (the
  default on Python 3.12+, where fork from a process with threads is deprecated; see
  ``crown_sync.children.process.DEFAULT_START_METHOD``).
* A spawned ProcessChild imports the crown's main module before its parent-death signal and
  deadline checks run (``multiprocessing`` does that first): the target never runs before them,
  but module-level code does, hence ``if __name__ == "__main__":`` around the crown.
* Timing is bounded by the scheduler: on a badly overloaded host the supervisor may act a few
  milliseconds after the deadline.

Lock descriptors (``term.fds``, e.g. the file oracle's flock) are inherited by process and
command children with every start method, so a lock held by descriptor stays held until the
last child holding it is gone.
"""

from typing import Optional

from .base import Child, RunningChild
from .command import CommandChild
from .process import ProcessChild
from .thread import ThreadChild

__all__ = [
    "Child",
    "RunningChild",
    "ThreadChild",
    "ProcessChild",
    "CommandChild",
    "as_child",
]


def as_child(spec, argument: str = "child") -> Optional[Child]:
    """Turn the ``child=`` argument of a crown into a :class:`Child` (or None).

    None stays None, a :class:`Child` is returned as is, a plain callable becomes
    ``ThreadChild(callable)``; anything else is a TypeError naming ``argument``.
    """
    if spec is None:
        return None
    if isinstance(spec, Child):
        return spec
    if isinstance(spec, type) and issubclass(spec, Child):
        raise TypeError(f"{argument} must be a Child instance, not the class {spec.__name__}")
    if callable(spec):
        return ThreadChild(spec)
    raise TypeError(
        f"{argument} must be None, a callable taking the term, or a ThreadChild/ProcessChild/"
        f"CommandChild, not {type(spec).__name__}"
    )
