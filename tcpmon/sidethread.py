"""Calls run beside the caller's own work: on one native side thread, or later by the caller.

A scrape is mostly the kernel's batch read of the connects map and the writing
of its lines, both outside the GIL, and some Python work: the small maps, the
probe's state, the grouped families.  The Python work is done beside the
GIL-free part, so on a node with a second CPU the scrape costs about its
biggest part, not the sum.  The collector does it in the event loop's own
thread (a Deferred) while it is cheap, and on the side thread when it is not.
It starts a side thread's call from the event loop's thread, before handing
the read to a native thread: started from that native thread, the side thread
was often woken onto the same CPU and ran first, not beside.

Built on `_thread` primitives that the caller passes in: under gevent the
server hands over the unpatched ones, so the side thread is a real thread and
its waits are real waits.  One call at a time: when the thread is busy (two
scrapes at once), the call runs in the thread that takes its result, so nothing
ever queues.
"""
import _thread


class _Call:
    """fn(*args), run once by whoever calls run(); result() gives its value or raises its exception."""

    def __init__(self, fn, args):
        self._fn, self._args = fn, args
        self._value = self._error = None

    def run(self):
        try:
            self._value = self._fn(*self._args)
        except BaseException as exc:   # re-raised in result(), in the caller's thread
            self._error = exc
        self._fn = self._args = None

    def result(self):
        if self._error is not None:
            raise self._error
        return self._value


class _LazyCall(_Call):
    """A call for a busy side thread: it runs in whichever thread takes its result (so a call
    started in the event loop's thread still runs in the native thread that waits for it)."""

    def result(self):
        if self._fn is not None:
            self.run()
        return super().result()


class Deferred(_Call):
    """fn(*args), run by its starter when it chooses (run()), while another thread may already
    wait for its result(): the collector's event loop does the small maps this way while a
    native thread reads the biggest."""

    def __init__(self, fn, *args, allocate_lock=_thread.allocate_lock):
        super().__init__(fn, args)
        self._finished = allocate_lock()
        self._finished.acquire()

    def run(self):
        super().run()
        self._finished.release()

    def result(self):
        with self._finished:   # released by run(), and again here for any later taker
            pass
        return super().result()


class _SideCall(Deferred):
    """A call posted to the side thread, which runs it: the first result() frees the thread."""

    def __init__(self, thread, fn, args):
        super().__init__(fn, *args, allocate_lock=thread.allocate_lock)
        self._thread = thread
        self._waiting = True

    def result(self):
        try:
            return super().result()
        finally:
            if self._waiting:
                self._waiting = False
                self._thread.idle.release()


class SideThread:
    """start(fn, *args) -> a handle whose result() returns fn's result (or raises its exception).
    The thread starts with the first call and lives as long as the process.  Every handle's
    result() must be taken (in a finally): until it is, the thread counts as busy."""

    def __init__(self, start_new_thread=_thread.start_new_thread, allocate_lock=_thread.allocate_lock):
        self._start_new_thread = start_new_thread
        self.allocate_lock = allocate_lock
        self.idle = allocate_lock()       # held from start() until the caller took the result
        self._posted = allocate_lock()    # released when a call is posted
        self._posted.acquire()
        self._job = None
        self._running = False

    def start(self, fn, *args):
        if not self.idle.acquire(False):
            return _LazyCall(fn, args)   # busy with another caller's call: this one runs in the taker
        if not self._running:
            self._start_new_thread(self._loop, ())
            self._running = True
        job = self._job = _SideCall(self, fn, args)
        self._posted.release()
        return job

    def _loop(self):
        while True:
            self._posted.acquire()
            job, self._job = self._job, None
            job.run()


def run_here(fn, *args):
    """start() without a side thread: the call runs in the caller, now."""
    call = _Call(fn, args)
    call.run()
    return call
