"""A private, throwaway PostgreSQL server for the tests, from the installed binaries.

It listens only on a Unix socket in its own directory (no TCP port, so no port to race
for and nothing to collide with the machine's shared server on 5432). As root (CI), the
server runs as the ``postgres`` user, as PostgreSQL refuses to run as root. A missing
binary is a test failure that says what to install. A server left behind by a test
run that was killed is stopped by the next one.
"""

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

INSTALL_HINT = (
    "the PostgreSQL server binaries (initdb, pg_ctl) are not installed: install the "
    "PostgreSQL server package (Debian/Ubuntu: apt install postgresql; macOS: brew "
    "install postgresql), or put its bin directory on PATH"
)


def _binary(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if found is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class PrivatePostgres:
    def __init__(self) -> None:
        self.initdb = _binary("initdb")
        self.pg_ctl = _binary("pg_ctl")
        self._as: list[str] = []
        owner = None
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                pytest.fail(
                    "running as root, the tests run PostgreSQL as the 'postgres' user, which "
                    "does not exist: " + INSTALL_HINT,
                    pytrace=False,
                )
            self._as = ["runuser", "-u", "postgres", "--"]
        self._stop_leftovers()
        self.dir = Path(tempfile.mkdtemp(prefix="parley-pg-"))
        self.data = self.dir / "data"
        (self.dir / "owner.pid").write_text(str(os.getpid()))
        if owner is not None:
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)
        try:
            self._run(self.initdb, "-D", str(self.data), "-A", "trust", "-U", "parley", "--no-sync")
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self._databases = 0

    def _stop_leftovers(self) -> None:
        for pidfile in Path(tempfile.gettempdir()).glob("parley-pg-*/owner.pid"):
            try:
                if _alive(int(pidfile.read_text())):
                    continue
            except (OSError, ValueError):
                pass
            data = pidfile.parent / "data"
            if (data / "postmaster.pid").exists():
                subprocess.run(
                    [*self._as, self.pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
                    capture_output=True,
                    timeout=60,
                    check=False,
                )
            shutil.rmtree(pidfile.parent, ignore_errors=True)

    def _run(self, *command: str) -> None:
        done = subprocess.run(
            [*self._as, *command], capture_output=True, text=True, timeout=120, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {done.stdout}{done.stderr}")

    def start(self) -> None:
        options = f"-F -k {self.dir} -c listen_addresses= -c max_connections=200"
        log = str(self.dir / "server.log")
        self._run(self.pg_ctl, "-D", str(self.data), "-o", options, "-l", log, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(self.pg_ctl, "-D", str(self.data), "-m", mode, "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://parley@/{database}?host={self.dir}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """What ``sql`` prints, unaligned, as the superuser."""
        psql = shutil.which("psql") or _binary("psql")
        done = subprocess.run(
            [psql, self.url(database), "-qAtc", sql],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return done.stdout.strip()

    def hold(self, sql: str, database: str) -> "HeldSession":
        """A psql session that has run ``sql`` and stays open, keeping its locks and
        its transaction, until ``release``. Blocking: call it from a thread."""
        psql = shutil.which("psql") or _binary("psql")
        process = subprocess.Popen(
            [psql, self.url(database), "-qAt", "-v", "ON_ERROR_STOP=1"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdin is not None and process.stdout is not None
        # A lock that never comes fails the statement, so the test fails, not hangs.
        process.stdin.write(f"SET lock_timeout = '30s'; {sql};\n\\echo parley-held\n")
        process.stdin.flush()
        for line in process.stdout:  # psql runs the statements in order, then echoes
            if line.strip() == "parley-held":
                return HeldSession(process)
        process.kill()
        process.wait()
        raise RuntimeError(f"psql ended before it ran {sql!r}")

    def new_database(self) -> str:
        """The URL of a fresh, empty database."""
        self._databases += 1
        name = f"t{os.getpid()}_{self._databases}"
        self.psql(f"CREATE DATABASE {name}")
        return self.url(name)

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except RuntimeError:
            pass  # not running
        shutil.rmtree(self.dir, ignore_errors=True)


class HeldSession:
    """A psql session ``PrivatePostgres.hold`` left open."""

    def __init__(self, process: "subprocess.Popen[str]") -> None:
        self._process = process

    def release(self) -> None:
        """End the session, as a crash would: the server frees what it held."""
        self._process.kill()
        self._process.wait()
        for stream in (self._process.stdin, self._process.stdout):
            if stream is not None:
                stream.close()


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """A started private server, destroyed when the block ends."""
    server = PrivatePostgres()
    try:
        server.start()
        yield server
    finally:
        server.destroy()
