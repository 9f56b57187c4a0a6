"""Server mode on this machine, for the tests and the benchmarks: worker processes, a
``mars serve`` process and a scratch PostgreSQL database.

:class:`LocalWorkers` starts ``celery -A workers.app worker`` processes (solo pool: one task
at a time per process, so N processes are N-way parallel) that share one environment — the
catalog, the broker and ``MARS_HOME`` — and can SIGKILL and restart them by name.
:func:`served_api` runs ``mars serve`` on a free port until the block ends.
:func:`scratch_database` creates a uniquely named database and drops it afterwards.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg
from psycopg import sql

REPO = Path(__file__).resolve().parent.parent


class LocalWorkers:
    """Named worker processes sharing ``env`` (the ``MARS_*`` settings); logs in ``logs``/<name>.log.

    Args:
        env: extra environment of every worker (e.g. ``MARS_DATABASE_URL``, ``MARS_BROKER_URL``,
            ``MARS_HOME``), on top of this process's environment.
        logs: folder for one log file per worker name (appended on restart).
    """

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = {**os.environ, **env}
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, queues: str) -> None:
        """Start worker ``name`` consuming ``queues`` (comma-separated, e.g. ``"ingest,embed"``)."""
        log = (self.logs / f"{name}.log").open("a")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", queues, "-P", "solo",
             "-n", f"{name}@%h", "--without-gossip", "--without-mingle", "-l", "INFO"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        )
        log.close()

    def kill(self, name: str) -> None:
        """SIGKILL worker ``name`` (no cleanup: its reserved task stays unacknowledged)."""
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(10)

    def stop(self, name: str, timeout_s: float = 60) -> None:
        """Stop worker ``name`` warmly (SIGTERM: it finishes its task and releases its stores)."""
        self.procs[name].send_signal(signal.SIGTERM)
        self.procs[name].wait(timeout_s)

    def stop_all(self) -> None:
        """SIGTERM every worker; SIGKILL those still running after 30 s."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def log_tails(self, chars: int = 1500) -> dict[str, str]:
        """The last ``chars`` characters of each worker's log."""
        return {n: (self.logs / f"{n}.log").read_text()[-chars:] for n in self.procs}


@contextmanager
def scratch_database(admin_url: str, prefix: str) -> Iterator[str]:
    """Create the database ``<prefix>_<pid>_<8 hex>`` with ``admin_url`` (a libpq URL with
    CREATE DATABASE rights, e.g. ``postgresql://postgres@127.0.0.1:5432/postgres``), yield its
    SQLAlchemy URL (``postgresql+psycopg://``), then drop it. Databases of this prefix left by
    killed runs on this host (their pid is gone) are dropped first.

    Raises:
        psycopg.OperationalError: the server is not reachable.
    """
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as admin:
        _drop_stale(admin, admin_url, prefix)
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    info = psycopg.conninfo.conninfo_to_dict(admin_url)
    user, host, port = info.get("user", "postgres"), info.get("host", "127.0.0.1"), info.get("port", "5432")
    try:
        yield f"postgresql+psycopg://{user}@{host}:{port}/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _drop_stale(admin: psycopg.Connection, admin_url: str, prefix: str) -> None:
    """Drop ``<prefix>_<pid>_*`` databases whose pid no longer runs (only on a local server)."""
    host = psycopg.conninfo.conninfo_to_dict(admin_url).get("host", "")
    if host not in ("", "127.0.0.1", "localhost", "::1") and not host.startswith("/"):
        return  # a shared server: other hosts' pids mean nothing here
    pattern = prefix.replace("_", "\\_") + "\\_%"
    for (name,) in admin.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (pattern,)).fetchall():
        match = re.fullmatch(rf"{re.escape(prefix)}_(\d+)_[0-9a-f]{{8}}", name)
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        except PermissionError:
            continue  # alive, another user's


def free_port() -> int:
    """An unused local TCP port (bound once by the OS, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served_api(env: dict[str, str], log: Path, *args: str, timeout_s: float = 120.0) -> Iterator[str]:
    """:func:`served_process`, yielding only the base URL."""
    with served_process(env, log, *args, timeout_s=timeout_s) as (url, _):
        yield url


@contextmanager
def served_process(env: dict[str, str], log: Path, *args: str,
                   timeout_s: float = 120.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run ``mars serve --port <free port> *args`` with ``env`` on top of this process's
    environment, its output in the file ``log`` (a file, not a pipe nobody reads, so its log
    lines can never block it); yield its base URL and its process once ``/healthz`` answers;
    terminate it after the block (SIGKILL if it has not stopped within 30 s).

    Raises:
        RuntimeError: the server exited, or did not answer within ``timeout_s`` seconds (the
            message carries the end of its log).
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mars.cli", "serve", "--port", str(port), *args],
                                env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mars serve exited with {proc.returncode}: {log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mars serve did not answer in {timeout_s:.0f} s: {log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
