"""A private CUDA MPS daemon for the benchmark's concurrent-trial rows (``--mps``).

Why: several trials on one GPU are several CUDA contexts, which the GPU time-slices; NVIDIA's Multi-Process
Service funnels them into one context so that their kernels can run side by side. Whether that pays for
3-D ResNet trials is a measurement, so the benchmark runs the same concurrent processes with and without it.

The daemon gets its own pipe and log folders (``CUDA_MPS_PIPE_DIRECTORY``, ``CUDA_MPS_LOG_DIRECTORY``), so it
neither needs root nor touches a daemon the machine may already run; only processes started with the
environment :func:`private_mps` yields connect to it. It is told to quit when the block ends, error or not.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

CONTROL = "nvidia-cuda-mps-control"
# A system-wide daemon listens here; clients without CUDA_MPS_PIPE_DIRECTORY use it silently.
DEFAULT_PIPE_DIRECTORY = "/tmp/nvidia-mps"


class MpsUnavailable(RuntimeError):
    """MPS could not be started here; the message says why and what to do."""


def system_mps_running(pipe_directory: str = DEFAULT_PIPE_DIRECTORY) -> bool:
    """True when a machine-wide MPS daemon seems to run: then even the "without MPS" rows go through it."""
    return os.path.exists(os.path.join(pipe_directory, "control"))


def log_tail(env: dict[str, str], lines: int = 5) -> str:
    """The last lines of the private daemon's logs: why a client could not connect, usually."""
    folder = env.get("CUDA_MPS_LOG_DIRECTORY", "")
    tails = []
    for name in ("control.log", "server.log"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with open(path, errors="replace") as log:
                tails += [f"{name}: {line.rstrip()}" for line in log.readlines()[-lines:]]
    return "; ".join(tails) or "no MPS log written"


@contextlib.contextmanager
def private_mps(timeout_s: float = 30.0) -> Iterator[dict[str, str]]:
    """Starts an MPS control daemon in private folders; yields the environment its clients need.

    Raises :class:`MpsUnavailable` naming the reason when the control program is missing or will not start.
    """
    control = shutil.which(CONTROL)
    if control is None:
        raise MpsUnavailable(f"{CONTROL} is not on PATH: it comes with the NVIDIA driver (Linux only); "
                             f"install the driver's utilities or run the benchmark with --mps off")
    # Cleanup errors ignored: "quit" may return while the daemon still writes its last log lines, and a
    # finished benchmark must not end in "Directory not empty" instead of its table.
    with tempfile.TemporaryDirectory(prefix="mps-", ignore_cleanup_errors=True) as folder:
        env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": os.path.join(folder, "pipe"),
               "CUDA_MPS_LOG_DIRECTORY": os.path.join(folder, "log")}
        os.makedirs(env["CUDA_MPS_PIPE_DIRECTORY"])
        os.makedirs(env["CUDA_MPS_LOG_DIRECTORY"])
        try:
            started = subprocess.run([control, "-d"], env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise MpsUnavailable(f"{CONTROL} -d did not return within {timeout_s:g} s; {log_tail(env)}") from None
        if started.returncode != 0:
            detail = (started.stderr or started.stdout).strip() or f"exit {started.returncode}"
            raise MpsUnavailable(f"{CONTROL} -d failed: {detail} (a container may need the host's IPC namespace, "
                                 f"or the GPU's compute mode forbids it)")
        try:
            yield env
        finally:
            # "quit" stops the daemon and its server once the clients have gone. A daemon that does not answer
            # in time is left to the driver; the rows measured so far are what matter.
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run([control], input="quit\n", env=env, capture_output=True, text=True, timeout=timeout_s)
