"""A private, throwaway redis-server for the tests and benchmarks, from the installed binary.

It listens on a free TCP port on 127.0.0.1 (several nodes of a cluster test connect to
one server by URL), never on 6379, where the machine may run a shared Redis. It keeps
nothing on disk (``--save ''``, no AOF) and runs in its own temporary directory. The
fault helpers (``stop``/``start``, ``pause``/``resume``, ``kill``) are for tests of a
client that must survive a server that goes away or hangs; ``start`` after a stop comes
back on the same port, empty. A missing binary is a test failure that says what to
install.
"""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hiredis

INSTALL_HINT = (
    "redis-server is not installed: install the Redis server package (Debian/Ubuntu: "
    "apt install redis-server; macOS: brew install redis), or put it on PATH"
)


class RedisServerMissing(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PrivateRedis:
    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisServerMissing(INSTALL_HINT)
        self.binary = binary
        self.dir = Path(tempfile.mkdtemp(prefix="parley-redis-"))
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the server (again, empty, on the same port) and wait until it answers."""
        assert self.process is None, "already running"
        with open(self.dir / "server.log", "ab") as log:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    "--port", str(self.port),
                    "--bind", "127.0.0.1",
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", str(self.dir),
                    "--databases", "16",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.command("PING") == b"PONG":
                    return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                log_text = (self.dir / "server.log").read_text(errors="replace")
                self.kill()
                raise RuntimeError(f"redis-server did not start:\n{log_text}")
            time.sleep(0.02)

    def command(self, *args: bytes | str | int) -> object:
        """One command over a new blocking connection; an error reply is returned."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(hiredis.pack_command(args))  # type: ignore[arg-type]
            reader = hiredis.Reader()
            while (reply := reader.gets()) is False:
                data = s.recv(65536)
                if not data:
                    raise ConnectionError("redis-server closed the connection")
                reader.feed(data)
            return reply

    def stop(self) -> None:
        """Stop the server (SIGTERM) and wait for it to exit."""
        if self.process is None:
            return
        self.resume()
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def kill(self) -> None:
        """SIGKILL: gone at once, no goodbye to the clients."""
        if self.process is None:
            return
        self.process.kill()
        self.process.wait()
        self.process = None

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections but nothing answers."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGCONT)

    def destroy(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def private_redis() -> Iterator[PrivateRedis]:
    """A started private server, destroyed when the block ends."""
    server = PrivateRedis()
    try:
        server.start()
        yield server
    finally:
        server.destroy()
