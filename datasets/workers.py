"""Worker pools for the long data steps (preprocessing, registration) that Ctrl-C stops cleanly.

Ctrl-C in a terminal sends SIGINT to every process of the foreground group: the driver and each spawned
worker. Left alone, every worker prints its own KeyboardInterrupt traceback (during its imports or in the
middle of a volume), the pool breaks, and concurrent.futures adds an InvalidStateError of its own. Here only
the driver is interrupted: workers are started with SIGINT blocked, so they never see it, and the driver
terminates and joins them before the KeyboardInterrupt goes on to the caller, which prints one line.

A worker initializer that ignores SIGINT would come too late: a spawned worker first imports the driver's
main module (tune_main imports torch, torchio and Ray: seconds), and the initializer runs only after that.
A signal mask is inherited through fork and exec instead, which is how multiprocessing starts its own
resource tracker immune to Ctrl-C.
"""
from __future__ import annotations

import contextlib
import signal
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Callable, Iterator, Sequence

_TERMINATE_WAIT_S = 10  # SIGTERM ends a worker at once; only a stuck one is killed after this


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a data step; ``str()`` says what was interrupted, what is kept and how to go on.

    A KeyboardInterrupt still, so that a caller stops as for any Ctrl-C (tune_main: exit status 130).
    """


def stopped(message: str, log) -> Interrupted:
    """The exception to raise after Ctrl-C stopped a step, its message logged first (whatever the caller prints)."""
    log.warning("%s", message)
    return Interrupted(message)


@contextlib.contextmanager
def sigint_blocked() -> Iterator[None]:
    """SIGINT blocked in this thread, so processes started inside inherit it blocked (POSIX; a no-op elsewhere).

    A Ctrl-C that arrives meanwhile is not lost: it stays pending and is delivered when the block ends.
    """
    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover - Windows
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def run_in_workers(function: Callable, jobs: Sequence[tuple], workers: int, on_result: Callable[[int, object], None],
                   initializer: Callable[[], None] | None = None) -> None:
    """``function(*jobs[i])`` in ``workers`` spawned processes; ``on_result(i, result)`` here as each one finishes.

    Any exception here (Ctrl-C included: only this process gets it) terminates and joins the workers before it
    propagates, so none is left running and none prints a traceback.
    """
    # spawn: forking a process that already holds torch/Ray threads is not safe.
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=initializer)
    try:
        with sigint_blocked():  # submit starts the workers: they inherit the block
            futures = {pool.submit(function, *job): index for index, job in enumerate(jobs)}
        for future in as_completed(futures):
            on_result(futures[future], future.result())
    except BaseException:
        _terminate(pool)
        raise
    pool.shutdown()


def _terminate(pool: ProcessPoolExecutor) -> None:
    """Stop the workers now (a volume can take minutes), not after the tasks they are running.

    The futures are not cancelled by hand: the pool's own thread may still mark them failed, and on Python 3.11 a
    cancelled future there raises InvalidStateError in that thread.
    """
    processes = list((getattr(pool, "_processes", None) or {}).values())  # Python 3.14: pool.terminate_workers()
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(_TERMINATE_WAIT_S)
        if process.is_alive():
            process.kill()
            process.join()
