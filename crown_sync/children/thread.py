"""Thread children: ``target(term, ...)`` in a daemon thread of the crown's process."""

import threading
from typing import Optional

from .base import Child, RunningChild, _callable_name, _check_args, _check_kwargs, _check_target, logger


class ThreadChild(Child):
    """Run ``target(term, *args, **kwargs)`` in a daemon thread while the term lasts.

    The target must return soon after ``term.stop_event`` is set (``wait()`` on it, or check
    ``is_set()`` before each action): the event is set when the term ends and reads as set once
    the term's deadline has passed. ``stop()`` waits up to ``grace`` seconds for the thread; a
    thread cannot be killed, so one that does not return is logged and left running. An
    exception in the target is logged with its traceback and gives exit code 1.
    """

    kind = "thread"

    def __init__(self, target, args=(), kwargs=None, grace: float = 5.0):
        super().__init__(grace)
        self.target = _check_target(target)
        self.args = _check_args(args)
        self.kwargs = _check_kwargs(kwargs)

    def start(self, term, on_exit) -> "RunningChild":
        running = _RunningThread(self, term, on_exit)
        running._thread.start()
        return running

    def __repr__(self) -> str:
        return f"ThreadChild({_callable_name(self.target)}, grace={self.grace})"


class _RunningThread(RunningChild):
    kind = "thread"

    def __init__(self, child: ThreadChild, term, on_exit):
        super().__init__(child, term, on_exit)
        self._thread = threading.Thread(
            target=self._run, name=f"crown-sync-child:{term.name}", daemon=True
        )

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def _run(self) -> None:
        code = 0
        try:
            self.child.target(self.term, *self.child.args, **self.child.kwargs)
        except SystemExit as exc:
            code = 0 if exc.code in (None, 0) else 1
        except BaseException:
            logger.exception(
                "thread child %s of %r raised", _callable_name(self.child.target), self.term.name
            )
            code = 1
        self._finish(code)

    def stop(self, timeout: Optional[float] = None) -> None:
        """End the term (sets ``stop_event``) and wait up to ``grace`` for the thread.

        If the thread does not return in time, log a warning and return: it keeps running.
        """
        self.term.end()
        with self._lock:
            if not self._stopping:
                self._stopping = True
                self.reason = "stopped"
        if threading.current_thread() is self._thread:
            return  # called from the target (or its on_exit): waiting for ourselves would hang
        if not self._finished.wait(self._graceful_wait(timeout)):
            logger.warning(
                "thread child %s of %r did not return within %.1f s of the end of its term; "
                "a thread cannot be killed, it keeps running (only the fencing token protects "
                "what it does now)",
                _callable_name(self.child.target),
                self.term.name,
                self._graceful_wait(timeout),
            )

    def kill(self) -> None:
        # Nothing more is possible for a thread: its stop_event already reads as set.
        self.term.end()
        self.reason = self.reason or "killed"

