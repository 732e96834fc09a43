"""A throwaway PostgreSQL server for tests, from the distribution's binaries (initdb, pg_ctl).

`postgres_url` (a pytest fixture, import it into a test module) starts one per test module
on a free port of 127.0.0.1 with trust auth and a fresh database, yields its SQLAlchemy URL
and stops it afterwards. Without the binaries it skips, except under CI (env CI set), where
it fails: CI must really test against PostgreSQL.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

DATABASE = "deltapass_test"


def find_bin_dir() -> Path | None:
    """The dir holding initdb, pg_ctl and postgres of one version (newest of /usr/lib/postgresql/* if not on PATH)."""
    found = shutil.which("initdb")
    candidates = [Path(found).resolve().parent] if found else []    # /usr/local/bin/initdb may be a symlink
    candidates += sorted((Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")),
                         key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    for bin_dir in candidates:
        if all((bin_dir / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return bin_dir
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unprivileged_user() -> pwd.struct_passwd | None:
    """postgres refuses to run as root: as root, run it as the distribution's postgres user (else nobody)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL")


def _run(command: list[str], user: pwd.struct_passwd | None) -> None:
    if user is not None:
        # setpriv switches uid/gid without a login session (runuser needs PAM); both come with util-linux.
        command = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd="/")
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")


@contextmanager
def postgres_server(bin_dir: Path) -> Iterator[str]:
    """Start a server from bin_dir, create DATABASE, yield its SQLAlchemy URL, stop and delete it."""
    import psycopg2

    user = _unprivileged_user()
    # Not under pytest's tmp dirs: those are 0700 root-owned, the server's user could not reach its data.
    base = Path(tempfile.mkdtemp(prefix="deltapass-pg-"))
    data, logfile = base / "data", base / "server.log"
    data.mkdir()
    if user is not None:
        for path in (base, data):
            os.chown(path, user.pw_uid, user.pw_gid)
    port = _free_port()
    started = False
    try:
        _run([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
              "--locale=C", "--no-sync"], user)
        with open(data / "postgresql.conf", "a") as conf:
            # A test server: loopback only, no unix socket (/var/run/postgresql may not exist), no durability.
            conf.write(f"\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = ''\n"
                       "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 50\n")
        _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(logfile), "-w", "-t", "60", "start"], user)
        started = True
        admin = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        try:
            admin.autocommit = True
            with admin.cursor() as cur:
                cur.execute(f"CREATE DATABASE {DATABASE}")
        finally:
            admin.close()
        yield f"postgresql://postgres@127.0.0.1:{port}/{DATABASE}"   # the form --help documents
    finally:
        if started:
            _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], user)
        shutil.rmtree(base, ignore_errors=True)


def _unavailable(why: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL tests cannot run under CI: {why}", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    bin_dir = find_bin_dir()
    if bin_dir is None:
        _unavailable("no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        _unavailable("psycopg2 is not installed (pip install psycopg2-binary)")
    with postgres_server(bin_dir) as url:
        yield url
