"""An emulated cluster for tests: 2 to 4 "nodes" on this machine, each with its own network, name and memory.

A node is a network namespace with one interface (`eth0`, its own address on a private bridge) plus mount,
UTS, IPC and PID namespaces held by one init process (tests/node_init.py): its own hostname, its own
/etc/hosts listing every node (optionally Debian's `127.0.1.1 HOSTNAME` line instead of its own address, the
loopback-hostname trap), an empty /tmp and /dev/shm, an optional node-local scratch directory (the same path
on every node, a different directory behind it), and the shared directories (the cluster filesystem) at the
same paths as on the host. The bridge lives in a namespace of its own with no address and no route, so
traffic flows only between the nodes of this cluster: nothing reaches the host or the outside.

    with Cluster(2, loopback_hostname=[0]) as cluster:        # or the module-scoped pytest fixture of a test file
        a, b = cluster.nodes                                  # .name / .hostname ("node1"), .address, .interface ("eth0")
        server = a.popen([sys.executable, "-m", "http.server", "--bind", a.address, "8000"])
        result = b.run([sys.executable, "-c", "import urllib.request as u; print(u.urlopen('http://node1:8000/').status)"])
        cluster.cut(b); cluster.restore(b)                    # a partition: b's port leaves the bridge (link stays up)
        b.kill_all(); b.boot()                                # every process of b dies at once; boot: a fresh /tmp, /dev/shm
        cluster.shared                                        # a directory every node sees (under cluster.root)

  `Cluster(num_nodes=2, *, shared=(), loopback_hostname=(), scratch=False, shm_size=None, root=None)`: `shared`
        more host directories every node sees at their paths; `loopback_hostname` the node indices (or True:
        all) whose /etc/hosts has Debian's line; `scratch` a node-local directory at `node.scratch`; `shm_size`
        the size of each node's /dev/shm (e.g. "1m"; multiprocessing's semaphores need a few pages of it).
  `Node.run(cmd, env=None, timeout=300, cwd=REPO, check=True)`  -> tests.procs.Result, like tests/procs.run
  `Node.popen(cmd, env=None, cwd=REPO, **popen_kwargs)`         -> subprocess.Popen (its own session)
        Both start the command inside the node (nsenter into its init's namespaces; the command is a child of
        nsenter, in the node's PID namespace), with the environment cleaned as tests/procs.clean_env does (no
        launcher variables), in a session of its own: `tests.procs.kill_group(proc)` ends it with everything
        it started (Popen.kill would end nsenter only).
  `Node.kill_all()`  a power loss: SIGKILL to the node's init, by PID; the kernel kills every process of the
        node's PID namespace with it, atomically (nothing can fork away). Returns once they are all gone. The
        node's network namespace stays (its peers get connection resets, not silence: cut it first to have
        silence); `node.up` is False and run/popen refuse until `node.boot()` starts it afresh (an empty /tmp and
        /dev/shm, as after a reboot; scratch and shared directories keep their contents).
  `Node.processes()` host PIDs of the processes living in the node (all but its init).
  `Cluster.cut(node)` / `Cluster.restore(node)`  take the node's bridge port out of the bridge / put it back.
        Neither side sees a link change or gets an error: packets vanish, as when a switch port dies, so TCP
        peers hang until their own timeouts.
  `Cluster.run_together([(node, cmd), ...], env=None, timeout=300, check=True)` -> [Result]: one command per
        node started at once (a multi-node launch), all killed on timeout.
  `Cluster.rsh_agent`  an executable `AGENT HOST COMMAND...` that runs COMMAND on node HOST with the caller's
        stdio, for Open MPI's `--mca plm_rsh_agent` (tests/node_rsh.py; served from the host over a Unix socket).

Teardown (`close`, also from `__exit__`, the fixture's finalizer and atexit) kills every node, deletes every
namespace (and with them the veths and the bridge) and the cluster's root directory. What a crashed session
leaves cannot outlive it for long: each init exits when the test process's end closes its lifeline pipe
(SIGKILL included); namespace names carry the creating PID, and the next cluster deletes those whose
creator is gone. Needs root and iproute2/util-linux (`ip`, `unshare`, `nsenter`, `mount`); `unavailable()`
says why not, for the tests' skip reason.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import json
import os
import re
import select
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

import psutil

from .procs import REPO, Result, clean_env, kill_group, run

TOOLS = ("ip", "unshare", "nsenter", "mount")
NAME_PREFIX = "dtc"  # netns names: dtc<creator pid>x<cluster number>-<node>; a dead creator's are removed
NETNS_RE = re.compile(rf"^{NAME_PREFIX}(\d+)x\d+-")
ROOT_PREFIX = "dist_train_cluster-"
INIT = Path(__file__).resolve().parent / "node_init.py"
RSH = Path(__file__).resolve().parent / "node_rsh.py"
_CLUSTERS = itertools.count(1)


@functools.lru_cache(maxsize=None)
def unavailable() -> str:
    """Why an emulated cluster cannot be made here ('' when it can)."""
    if os.geteuid() != 0:
        return "the emulated cluster needs root (network, mount and PID namespaces); CI runs as root"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} missing; run tests/install_system_deps.sh as root (iproute2, util-linux)"
    probe = f"{NAME_PREFIX}{os.getpid()}x0-probe"
    try:
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
        if made.returncode != 0:
            return f"cannot create a network namespace here: {made.stderr.strip()}"
        pid_ns = subprocess.run(["unshare", "--mount", "--uts", "--ipc", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, text=True)
        if pid_ns.returncode != 0:
            return f"cannot create mount/UTS/PID namespaces here: {pid_ns.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def _under_private_mounts(path: Path) -> bool:
    """Inside a node, /tmp and /dev/shm are its own: a host path under them must be shared to be seen."""
    return any(path == top or top in path.parents for top in (Path("/tmp"), Path("/dev/shm")))


def remove_leftovers() -> None:
    """Namespaces and root directories of clusters whose creating process is gone (a crashed session)."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        match = NETNS_RE.match(name)
        if match and not psutil.pid_exists(int(match.group(1))):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
    for root in Path(tempfile.gettempdir()).glob(f"{ROOT_PREFIX}*-*"):
        pid = root.name[len(ROOT_PREFIX):].split("-")[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(root, ignore_errors=True)


class Node:
    """One emulated host of a `Cluster`; see the module docstring."""

    interface = "eth0"

    def __init__(self, cluster: "Cluster", index: int, address: str, loopback_hostname: bool) -> None:
        self.cluster, self.index = cluster, index
        self.name = self.hostname = f"node{index + 1}"
        self.address = address
        self.loopback_hostname = loopback_hostname  # its /etc/hosts maps its own name to 127.0.1.1 (Debian's default)
        self.netns = f"{cluster.prefix}-{self.name}"
        self.port = f"p-{self.name}"  # its veth's other end, on the bridge
        self.dir = cluster.root / "nodes" / self.name
        self.scratch: Optional[Path] = cluster.root / "scratch" if cluster.with_scratch else None
        self._init: Optional[subprocess.Popen] = None  # `nsenter --net ... unshare`, the parent of the init
        self._init_pid: Optional[int] = None
        self._popens: list[subprocess.Popen] = []

    def __repr__(self) -> str:
        return f"Node({self.name}, {self.address}, {'up' if self.up else 'down'})"

    @property
    def up(self) -> bool:
        return self._init is not None and self._init.poll() is None

    # ------------------------------------------------------------ life

    def hosts_file(self) -> str:
        lines = ["127.0.0.1\tlocalhost"]
        if self.loopback_hostname:
            lines.append(f"127.0.1.1\t{self.hostname}")  # Debian's installer line; the node's own address is not listed
        lines.append("::1\tlocalhost ip6-localhost ip6-loopback")
        for node in self.cluster.nodes:
            if not (node is self and self.loopback_hostname):
                lines.append(f"{node.address}\t{node.hostname}")
        return "\n".join(lines) + "\n"

    def boot(self, timeout: float = 30) -> None:
        """Start the node's init (fresh mount, UTS, IPC and PID namespaces in the node's network namespace)."""
        if self.up:
            raise RuntimeError(f"{self.name} is already up")
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "hosts").write_text(self.hosts_file())
        spec = {
            "hostname": self.hostname, "hosts_file": str(self.dir / "hosts"), "shared": [str(p) for p in self.cluster.shared_dirs],
            "lifeline_fd": self.cluster.lifeline, "scratch": None, "scratch_mount": None, "shm_size": self.cluster.shm_size,
        }  # fmt: skip
        if self.scratch is not None:
            (self.dir / "scratch").mkdir(exist_ok=True)
            spec.update(scratch=str(self.dir / "scratch"), scratch_mount=str(self.scratch))
        cmd = [
            "nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--mount", "--uts", "--ipc", "--pid", "--fork", "--mount-proc",
            "--propagation", "private", sys.executable, "-S", str(INIT), json.dumps(spec),
        ]  # fmt: skip
        with open(self.dir / "init.log", "ab") as log:
            self._init = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, pass_fds=(self.cluster.lifeline,), start_new_session=True)
        ready, _, _ = select.select([self._init.stdout], [], [], timeout)
        line = self._init.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            self._stop_init()
            raise RuntimeError(f"{self.name} did not start: {(self.dir / 'init.log').read_text()[-2000:]}")
        self._init_pid = self._find_init()

    def _find_init(self) -> int:
        """The init is the unshare process's child (the only process of the node at this point)."""
        children = Path(f"/proc/{self._init.pid}/task/{self._init.pid}/children").read_text().split()
        if len(children) != 1:
            raise RuntimeError(f"{self.name}: expected one init under unshare, found {children}")
        return int(children[0])

    def kill_all(self, timeout: float = 30) -> None:
        """Power loss: every process of the node dies at once (SIGKILL to its init, by PID). Idempotent."""
        if self._init is None:
            return
        if self._init_pid is not None:
            try:
                os.kill(self._init_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._stop_init(timeout)
        deadline = time.monotonic() + timeout
        for proc in self._popens:  # nsenter parents (host side) exit once their child in the node is gone
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                kill_group(proc)
        self._popens.clear()

    def _stop_init(self, timeout: float = 30) -> None:
        proc, self._init, self._init_pid = self._init, None, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                proc.wait(timeout=timeout)  # returns once the kernel has reaped every process of the namespace
            except subprocess.TimeoutExpired:
                kill_group(proc)
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def processes(self) -> list[int]:
        """Host PIDs of the processes living in this node, its init excepted."""
        if not self.up:
            return []
        try:
            ns = os.readlink(f"/proc/{self._init_pid}/ns/pid")
        except OSError:
            return []
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != self._init_pid:
                try:
                    if os.readlink(f"/proc/{entry}/ns/pid") == ns:
                        found.append(int(entry))
                except OSError:
                    continue
        return found

    # ------------------------------------------------------------ commands

    def enter(self, cwd: Path | str = REPO) -> list[str]:
        """The command prefix that runs what follows inside this node, in directory `cwd` (a path the node sees)."""
        if not self.up:
            raise RuntimeError(f"{self.name} is down (kill_all); boot() it first")
        return ["nsenter", f"--target={self._init_pid}", "--net", "--mount", "--uts", "--ipc", "--pid", f"--wd={cwd}", "--"]

    def run(self, cmd: Sequence, env: Optional[dict] = None, timeout: float = 300, cwd: Path | str = REPO, check: bool = True) -> Result:
        """Like tests/procs.run, inside the node: bounded in time, its process group killed at the end."""
        return run([*self.enter(cwd), *cmd], timeout=timeout, env=env, check=check)

    def popen(self, cmd: Sequence, env: Optional[dict] = None, cwd: Path | str = REPO, **kwargs) -> subprocess.Popen:
        """A process started inside the node, in its own session; the caller waits for it (kill_all ends it too).
        The Popen is nsenter's, in front of the command: end both with tests.procs.kill_group(proc), not proc.kill()."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen([str(c) for c in [*self.enter(cwd), *cmd]], env=clean_env(env), cwd=str(REPO), start_new_session=True, **kwargs)
        self._popens = [p for p in self._popens if p.poll() is None] + [proc]
        return proc


class Cluster:
    """N emulated nodes joined by one bridge; see the module docstring. `start()` (or `with`) builds it."""

    def __init__(
        self,
        num_nodes: int = 2,
        *,
        shared: Iterable[Path | str] = (),
        loopback_hostname: Iterable[int] | bool = (),
        scratch: bool = False,
        shm_size: Optional[str] = None,
        root: Optional[Path] = None,
    ) -> None:
        if not 1 <= num_nodes <= 4:
            raise ValueError(f"an emulated cluster has 1 to 4 nodes, not {num_nodes}")
        self.number = next(_CLUSTERS)
        self.prefix = f"{NAME_PREFIX}{os.getpid()}x{self.number}"
        self.switch = f"{self.prefix}-switch"
        self._owns_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix=f"{ROOT_PREFIX}{os.getpid()}-"))
        self.root.chmod(0o755)  # daemons that drop root (munged) must reach the shared directories under it
        self.shared = self.root / "shared"  # the cluster filesystem: output directories, data, logs
        # The whole root is shared (hosts files, the rsh socket, per-node scratch behind the scratch mount), and
        # so are the checkout and the Python environment where the nodes' own /tmp would hide them.
        hidden = [p for p in {REPO, Path(sys.prefix).resolve()} if _under_private_mounts(p)]
        self.shared_dirs = [self.root, *(Path(p).resolve() for p in shared), *sorted(hidden)]
        self.with_scratch = scratch
        self.shm_size = shm_size  # tmpfs size= of each node's /dev/shm (e.g. "4k", as small as a container's); None: half the RAM
        on_loopback = set(range(num_nodes)) if loopback_hostname is True else set(loopback_hostname or ())
        subnet = f"10.{200 + self.number % 50}.{os.getpid() % 250}"
        self.nodes = [Node(self, i, f"{subnet}.{i + 1}", i in on_loopback) for i in range(num_nodes)]
        self.lifeline = -1
        self._lifeline_write = -1
        self._rsh: Optional[socketserver.BaseServer] = None
        self._made: list[str] = []  # namespaces created, deleted at close
        self._closed = False

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if name in (node.name, node.hostname, node.address):
                return node
        raise KeyError(f"no node {name!r} in {[n.name for n in self.nodes]}")

    # ------------------------------------------------------------ build / tear down

    def start(self, timeout: float = 30) -> "Cluster":
        reason = unavailable()
        if reason:
            raise RuntimeError(reason)
        remove_leftovers()
        atexit.register(self.close)
        try:
            self.shared.mkdir(parents=True, exist_ok=True)
            (self.root / "scratch").mkdir(exist_ok=True)
            self.lifeline, self._lifeline_write = os.pipe()
            self._add_netns(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for node in self.nodes:
                self._wire(node)
            for node in self.nodes:
                node.boot(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)

    def _wire(self, node: Node) -> None:
        """The node's eth0 and its peer on the bridge, both created directly in their namespaces (no name in the host's)."""
        self._add_netns(node.netns)
        _ip("-n", self.switch, "link", "add", node.port, "type", "veth", "peer", "name", node.interface, "netns", node.netns)
        _ip("-n", self.switch, "link", "set", node.port, "master", "br0", "up")
        _ip("-n", node.netns, "addr", "add", f"{node.address}/24", "dev", node.interface)
        _ip("-n", node.netns, "link", "set", node.interface, "up")
        _ip("-n", node.netns, "link", "set", "lo", "up")

    def close(self) -> None:
        """Everything `start` made goes: processes, namespaces (veths and bridge with them), the root directory."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for node in self.nodes:
            try:
                node.kill_all()
            except Exception:  # noqa: BLE001 - tear down the rest whatever happens
                pass
        if self._rsh is not None:
            self._rsh.shutdown()
            self._rsh.server_close()
        for name in reversed(self._made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        for fd in (self._lifeline_write, self.lifeline):
            if fd >= 0:
                os.close(fd)
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def run_together(self, commands: Sequence[tuple[Node, Sequence]], env: Optional[dict] = None, timeout: float = 300, check: bool = True) -> list[Result]:
        """Start every (node, command) at once, as a launcher starts one process per node; wait for all.
        On timeout every one is killed (by process group) and the outputs so far are in the AssertionError."""
        procs = [node.popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node, cmd in commands]
        outputs: dict[int, tuple[str, str]] = {}

        def collect(i: int, proc: subprocess.Popen) -> None:
            outputs[i] = proc.communicate()

        readers = [threading.Thread(target=collect, args=(i, p), daemon=True) for i, p in enumerate(procs)]
        for reader in readers:
            reader.start()
        deadline = time.monotonic() + timeout
        try:
            for reader in readers:
                reader.join(max(deadline - time.monotonic(), 0))
            hung = [i for i, reader in enumerate(readers) if reader.is_alive()]
        finally:
            for proc in procs:
                kill_group(proc)
        for reader in readers:
            reader.join(10)
        results = [Result(p.wait(), *outputs.get(i, ("", ""))) for i, p in enumerate(procs)]
        shown = "\n".join(f"--- {node.name}: {' '.join(map(str, cmd))} -> {r.returncode}\n{r.output[-4000:]}" for (node, cmd), r in zip(commands, results))
        if hung:
            raise AssertionError(f"timed out after {timeout}s (a hang) on {', '.join(commands[i][0].name for i in hung)}\n{shown}")
        if check and any(r.returncode != 0 for r in results):
            raise AssertionError(f"a command failed\n{shown}")
        return results

    # ------------------------------------------------------------ faults

    def cut(self, node: Node) -> None:
        """A partition: the node's port leaves the bridge; frames to and from it are dropped without a trace."""
        _ip("-n", self.switch, "link", "set", node.port, "nomaster")

    def restore(self, node: Node) -> None:
        _ip("-n", self.switch, "link", "set", node.port, "master", "br0")

    # ------------------------------------------------------------ ssh for MPI

    @property
    def rsh_agent(self) -> Path:
        """An `ssh`-like executable: `AGENT HOST COMMAND...` runs COMMAND on the node named HOST."""
        agent = self.root / "bin" / "node-rsh"
        if self._rsh is None:
            sock = self.root / "rsh.sock"
            self._rsh = _RshServer(str(sock), self)
            threading.Thread(target=self._rsh.serve_forever, name="cluster-rsh", daemon=True).start()
            agent.parent.mkdir(exist_ok=True)
            agent.write_text(f'#!/bin/sh\nexec {sys.executable} -S {RSH} {sock} "$@"\n')
            agent.chmod(0o755)
        return agent


class _RshServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, cluster: Cluster) -> None:
        self.cluster = cluster
        super().__init__(path, _RshHandler)


class _RshHandler(socketserver.BaseRequestHandler):
    """One `node-rsh HOST COMMAND`: run COMMAND on HOST with the agent's stdio; reply with its exit status."""

    def handle(self) -> None:
        conn = self.request
        message, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
        try:
            request = json.loads(message)
            node = self.server.cluster.node(request["host"])
            proc = node.popen(["/bin/sh", "-c", request["command"]], stdin=fds[0], stdout=fds[1], stderr=fds[2])
        except Exception as e:  # noqa: BLE001 - tell the agent, which exits 255 as ssh does
            conn.sendall(json.dumps({"error": f"{type(e).__name__}: {e}"}).encode() + b"\n")
            return
        finally:
            for fd in fds:
                os.close(fd)
        while proc.poll() is None:
            readable, _, _ = select.select([conn], [], [], 0.2)
            if readable and conn.recv(1) == b"":  # the agent was killed: so is the remote command
                kill_group(proc)
                proc.wait()
                return
        status = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
        conn.sendall(json.dumps({"status": status}).encode() + b"\n")
