"""The peers: servers a user might pick instead of Parley, installed by the benchmark
suite itself and driven by the same load generator.

Each peer runs as its own process on 127.0.0.1:PORT (optionally pinned to one CPU with
``taskset``) and implements one tiny contract, in one of two wire protocols (``kind``):

``socketio`` (peers ``socketio-node`` and ``python-socketio``)
    Engine.IO v4 over WebSocket only: connect to
    ``ws://127.0.0.1:PORT/socket.io/?EIO=4&transport=websocket&room=NAME``, receive the
    open packet ``0{...}``, send ``40``, receive ``40{...}``; the socket is then in room
    NAME. A publisher sends ``421["m","bench","hello"]`` (event ``m``, ack id 1) and gets
    ``431[]``; every other socket in room ``bench`` gets ``42["m","hello"]``. The server
    pings with ``2`` every 25 s and expects ``3`` within 20 s.

``websockets`` (peers ``websockets``, ``ws-node``, ``floor`` and ``trio-floor``)
    Connect to ``ws://127.0.0.1:PORT/?room=NAME``. A text frame ``<room>\\n<text>`` is
    broadcast as ``<text>`` to every other connection in ``<room>``, then the sender gets
    the text frame ``ok``. Standard WebSocket pings (the client library answers them).

No peer uses per-message compression or prints anything per message; each stops cleanly
on SIGTERM or SIGINT. The third-party code is installed under ``CACHE`` (never into the
project's virtualenv) by ``ensure_installed``, at the pinned versions below.
"""

import importlib.metadata
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import attrs

CACHE = Path(os.environ.get("PARLEY_BENCH_CACHE", Path.home() / ".cache" / "parley-bench"))

HERE = Path(__file__).resolve().parent

NODE_PINS: dict[str, str] = {"socket.io": "4.8.4", "ws": "8.23.0"}
PYTHON_PINS: dict[str, str] = {
    "python-socketio": "5.18.1",
    "uvicorn": "0.54.0",
    "websockets": "17.4",
    # What decides the Python peers' speed, pinned too so that figures stay comparable:
    "python-engineio": "4.15.1",
    "uvloop": "0.23.0",
    "httptools": "0.9.0",
}
# pip requirement strings; uvicorn[standard] is how people install it (uvloop, httptools,
# websockets, ...).
_PIP_EXTRAS: dict[str, str] = {"uvicorn": "uvicorn[standard]"}

Kind = Literal["socketio", "websockets"]
Runtime = Literal["node", "python", "stdlib"]


class PeerError(RuntimeError):
    """A peer cannot be installed, described or started."""


@attrs.frozen
class Peer:
    name: str
    kind: Kind  # the wire protocol the load generator speaks to it
    runtime: Runtime  # node: CACHE/node; python: CACHE/venv; stdlib: this interpreter
    script: str  # file beside this module, started with the runtime and the port

    def command(self, port: int) -> list[str]:
        """The argv that starts this peer on 127.0.0.1:``port`` (the process is the server
        itself: no shell, no npm, no forking launcher)."""
        if self.runtime == "node":
            runtime = _node()
        else:
            runtime = str(_venv_python()) if self.runtime == "python" else sys.executable
        return [runtime, str(HERE / self.script), str(port)]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.runtime == "node":
            env["NODE_PATH"] = str(_node_modules())
            env.setdefault("NODE_ENV", "production")
        else:
            for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
                env.pop(name, None)
            env["PYTHONUNBUFFERED"] = "1"
        return env


PEERS: dict[str, Peer] = {
    peer.name: peer
    for peer in (
        Peer("socketio-node", "socketio", "node", "socketio_server.js"),
        Peer("python-socketio", "socketio", "python", "pysio_server.py"),
        Peer("websockets", "websockets", "python", "ws_server.py"),
        Peer("ws-node", "websockets", "node", "ws_server.js"),
        Peer("floor", "websockets", "stdlib", "floor_server.py"),
        Peer("trio-floor", "websockets", "stdlib", "trio_floor_server.py"),
    )
}


def _peer(name: str) -> Peer:
    try:
        return PEERS[name]
    except KeyError:
        raise PeerError(f"unknown peer {name!r}; known: {', '.join(PEERS)}") from None


# --- installation -------------------------------------------------------------------------


def _node_prefix() -> Path:
    return CACHE / "node"


def _node_modules() -> Path:
    return _node_prefix() / "node_modules"


def _venv() -> Path:
    return CACHE / "venv"


def _venv_python() -> Path:
    return _venv() / "bin" / "python"


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        raise PeerError(
            "the Node peers need Node.js and npm on PATH: install "
            "them, e.g. `apt-get install nodejs npm` on Debian"
        )
    return node


def _npm() -> str:
    _node()
    npm = shutil.which("npm")
    if npm is None:
        raise PeerError(
            "the Node peers need npm on PATH (Node.js is there): install it, e.g. "
            "`apt-get install npm` on Debian"
        )
    return npm


def _installed_node(package: str) -> str | None:
    """The version of ``package`` under CACHE/node, or None."""
    import json

    try:
        manifest = json.loads((_node_modules() / package / "package.json").read_text())
    except (OSError, ValueError):
        return None
    version = manifest.get("version")
    return version if isinstance(version, str) else None


def _node_ok() -> bool:
    return all(_installed_node(name) == version for name, version in NODE_PINS.items())


def _normalize(project: str) -> str:
    return re.sub(r"[-_.]+", "-", project).lower()


def _venv_distributions() -> dict[str, str]:
    """{normalized project name: version} of what CACHE/venv holds."""
    found: dict[str, str] = {}
    for site in sorted(_venv().glob("lib/python*/site-packages")):
        for dist in importlib.metadata.distributions(path=[str(site)]):
            name = dist.metadata["Name"]
            if name:
                found.setdefault(_normalize(name), dist.version)
    return found


def _venv_ok() -> bool:
    if not _venv_python().exists():
        return False
    have = _venv_distributions()
    return all(have.get(_normalize(name)) == version for name, version in PYTHON_PINS.items())


def _install_node() -> None:
    npm = _npm()
    prefix = _node_prefix()
    prefix.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}@{version}" for name, version in NODE_PINS.items()]
    print(
        f"peers: installing {' '.join(pins)} into {prefix} (npm) ...", file=sys.stderr, flush=True
    )
    subprocess.run(
        [
            npm,
            "install",
            "--prefix",
            str(prefix),
            "--save-exact",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
            *pins,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    if not _node_ok():
        raise PeerError(f"npm did not install {' '.join(pins)} in {prefix}")


def _install_venv() -> None:
    venv = _venv()
    pins = " ".join(f"{name}=={version}" for name, version in PYTHON_PINS.items())
    print(f"peers: installing {pins} into {venv} (pip) ...", file=sys.stderr, flush=True)
    if not _venv_python().exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    requirements = [
        f"{_PIP_EXTRAS.get(name, name)}=={version}" for name, version in PYTHON_PINS.items()
    ]
    subprocess.run(
        [
            str(_venv_python()),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            *requirements,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    if not _venv_ok():
        raise PeerError(f"pip did not install {pins} in {venv}")


def ensure_installed(names: Iterable[str]) -> None:
    """Install what the named peers need under CACHE, unless it is there already at the
    pinned versions: socket.io and ws (npm) in CACHE/node, the Python peers in the virtualenv
    CACHE/venv (made with this interpreter)."""
    runtimes = {_peer(name).runtime for name in names}
    if "node" in runtimes:
        _node()
        if not _node_ok():
            _install_node()
    if "python" in runtimes and not _venv_ok():
        _install_venv()


# --- description --------------------------------------------------------------------------


def versions(name: str) -> str:
    """What the peer runs, read from what is installed, e.g.
    "socket.io 4.8.4 on Node v20.20.2"."""
    peer = _peer(name)
    if peer.runtime == "node":
        package = "socket.io" if peer.kind == "socketio" else "ws"
        version = _installed_node(package)
        if version is None:
            raise PeerError(f"{package} is not installed in {_node_prefix()}: ensure_installed")
        node = subprocess.run(
            [_node(), "--version"], check=True, capture_output=True, text=True
        ).stdout.strip()
        return f"{package} {version} on Node {node}"
    if name in ("floor", "trio-floor"):  # this interpreter and its venv: no peers' venv
        import platform

        python = f"{platform.python_implementation()} {platform.python_version()}"
        if name == "trio-floor":
            trio = importlib.metadata.version("trio")
            return f"a task per connection on trio {trio}, os.write per delivery, on {python}"
        return f"a raw epoll loop with os.write per delivery on {python}"
    if not _venv_python().exists():
        raise PeerError(f"no virtualenv at {_venv()}: ensure_installed first")
    have = _venv_distributions()

    def v(project: str) -> str:
        return have.get(_normalize(project), "(missing)")

    if name == "python-socketio":
        # pysio_server.py selects these explicitly (what uvicorn's "auto" picks).
        return (
            f"python-socketio {v('python-socketio')} on uvicorn {v('uvicorn')}"
            f" (uvloop {v('uvloop')}, httptools {v('httptools')}, websockets {v('websockets')})"
        )
    return f"websockets {v('websockets')} on {_python_version()} (asyncio event loop)"


def _python_version() -> str:
    return subprocess.run(
        [
            str(_venv_python()),
            "-c",
            "import platform; print(platform.python_implementation(), platform.python_version())",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


# --- running ------------------------------------------------------------------------------


def _wait_for_port(name: str, port: int, server: subprocess.Popen[bytes], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        code = server.poll()
        if code is not None:
            raise PeerError(f"peer {name} exited with code {code} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise PeerError(
                    f"peer {name} did not listen on 127.0.0.1:{port} within {seconds:g} s"
                ) from None
            time.sleep(0.05)


def _stop(server: subprocess.Popen[bytes], grace: float = 10) -> None:
    if server.poll() is not None:
        return
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(grace)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@contextmanager
def start(name: str, port: int, cpu: int | None, *, startup_timeout: float = 30) -> Iterator[int]:
    """Start peer ``name`` on 127.0.0.1:``port`` (pinned to CPU ``cpu`` with taskset unless
    None), wait until it accepts TCP connections and yield its PID: that of the server
    process itself (taskset execs it), for /proc/PID/stat and VmRSS. At exit: SIGTERM, and
    SIGKILL if it has not stopped within 10 s. Call ``ensure_installed`` first."""
    peer = _peer(name)
    if peer.runtime == "node" and not _node_ok():
        raise PeerError(
            f"{' '.join(NODE_PINS)} not installed in {_node_prefix()}: ensure_installed"
        )
    if peer.runtime == "python" and not _venv_python().exists():
        raise PeerError(f"no virtualenv at {_venv()}: ensure_installed first")
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        pass
    else:  # waiting for the port would "succeed" at once, measuring someone else
        raise PeerError(f"127.0.0.1:{port} already accepts connections: pick a free port")
    command = peer.command(port)
    if cpu is not None:
        taskset = shutil.which("taskset")
        if taskset is None:
            raise PeerError("pinning a peer to a CPU needs taskset (Debian: util-linux)")
        command = [taskset, "-c", str(cpu), *command]
    server = subprocess.Popen(command, env=peer.environment(), stdin=subprocess.DEVNULL)
    try:
        _wait_for_port(name, port, server, startup_timeout)
        yield server.pid
    finally:
        _stop(server)
