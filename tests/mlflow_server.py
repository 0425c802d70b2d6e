"""A real MLflow tracking server on 127.0.0.1 for tests, in its own process group."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(root: Path, port: int, log) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        # Tracking only: the server's job runner (huey consumers, for GenAI jobs) would
        # cost a minute of CPU here and serve nothing.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        start_new_session=True,  # its workers outlive it: stop the whole group
    )


def _stop(proc: subprocess.Popen) -> None:
    """Killed outright: nothing reads the server once a test is done with it, and a
    graceful stop takes seconds."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the whole group has already exited
        return
    proc.wait()


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextmanager
def mlflow_server(root: Path, template: Path, attempts: int = 3):
    """Yield the URI of ``mlflow server`` backed by sqlite under ``root``, a copy of the
    empty store ``template``. The free port can be taken before the server binds it; a
    server that exits before it is healthy is started again on another port."""
    shutil.copyfile(template, root / "mlflow.db")
    log_path = root / "mlflow_server.log"
    with open(log_path, "w") as log:
        for attempt in range(1, attempts + 1):
            port = _free_port()
            uri = f"http://127.0.0.1:{port}"
            proc = _start(root, port, log)
            deadline = time.time() + 120
            while not _healthy(uri) and proc.poll() is None and time.time() < deadline:
                time.sleep(0.25)
            exited = proc.poll() is not None  # before _stop: a timed-out server is no retry
            if not exited and _healthy(uri):
                break
            _stop(proc)
            if exited and attempt < attempts:
                log.write(f"\n[attempt {attempt} on port {port} exited; trying another port]\n")
                log.flush()
                continue
            raise RuntimeError(f"mlflow server did not start: {log_path.read_text()}")
        try:
            yield uri
        finally:
            _stop(proc)
