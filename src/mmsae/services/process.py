"""What the loopback servers share: a process group of their own, a health wait, a clean stop."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

logger = logging.getLogger(__name__)

LOG_TAIL_CHARS = 4000


def log_tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    """The end of a server's log file ("(no log)" when it cannot be read)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return text[-chars:]


def wait_healthy(
    proc: subprocess.Popen[bytes],
    url: str,
    timeout: float,
    what: str,
    log_path: Path,
    error: type[Exception],
    poll: float = 0.2,
) -> None:
    """Wait until ``url`` answers 200; raise ``error`` with the log's tail if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        code = proc.poll()
        if code is not None:
            raise error(f"{what} exited with code {code} before answering {url}; log {log_path}:\n{log_tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() > deadline:
            raise error(f"{what} did not answer {url} within {timeout:.0f} s; log {log_path}:\n{log_tail(log_path)}")
        time.sleep(poll)


def signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def group_gone(proc: subprocess.Popen[bytes], wait: float) -> bool:
    """True once no process of ``proc``'s group is left (waiting up to ``wait`` seconds)."""
    deadline = time.monotonic() + wait
    while True:
        proc.poll()  # reap the leader, so that a zombie does not count as alive
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def stop_group(proc: subprocess.Popen[bytes], timeout: float, what: str, grace: float = 2.0) -> None:
    """SIGTERM the process group we started (``start_new_session``), SIGKILL what is left after ``timeout``."""
    if proc.poll() is None:
        signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.warning("%s (pid %s) ignored SIGTERM for %.0f s; killing it", what, proc.pid, timeout)
    # children may outlive the leader; the group is ours alone
    if not group_gone(proc, wait=grace):
        signal_group(proc.pid, signal.SIGKILL)
        if not group_gone(proc, wait=5.0):
            logger.error("%s processes of group %s did not exit after SIGKILL", what, proc.pid)
