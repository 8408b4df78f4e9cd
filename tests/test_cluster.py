"""The emulated cluster itself (tests/cluster.py): what a node has of its own, what all share, and the faults.

Every other multi-node test trusts these facts: a node's hostname, addresses and /etc/hosts; a private /tmp,
/dev/shm and scratch; one shared directory; no way out of the cluster's network; a node killed at once; a link
cut and restored; an ssh for MPI; and nothing left behind, also by a session that was killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.cluster import Cluster, unavailable
from tests.procs import REPO, kill_group

pytestmark = [pytest.mark.cluster, pytest.mark.skipif(bool(unavailable()), reason=unavailable() or "n/a")]

PY = sys.executable


@pytest.fixture(scope="module")
def cluster():
    with Cluster(3, loopback_hostname=[2], scratch=True) as c:
        yield c


def py(node, code: str, timeout: float = 60, check: bool = True) -> str:
    return node.run([PY, "-c", textwrap.dedent(code)], timeout=timeout, check=check).output


def test_each_node_has_its_own_hostname_address_and_hosts_file(cluster):
    a, b, c = cluster.nodes
    assert [n.hostname for n in cluster.nodes] == ["node1", "node2", "node3"]
    assert len({n.address for n in cluster.nodes}) == 3
    for node in (a, b):
        shown = py(node, "import socket; print(socket.gethostname(), *(socket.gethostbyname(f'node{i}') for i in (1, 2, 3)))")
        assert shown.split() == [node.hostname, a.address, b.address, c.address]
        assert f"{node.address}/24" in node.run(["ip", "-o", "-4", "addr", "show", "dev", "eth0"]).stdout
        assert sorted(node.run(["ls", "/sys/class/net"]).stdout.split()) == ["eth0", "lo"]  # sysfs of its own network
    # Debian's trap on node3: its own name is 127.0.1.1 there, its real address everywhere else.
    assert py(c, "import socket; print(socket.gethostbyname('node3'), socket.gethostbyname('node1'))").split() == ["127.0.1.1", a.address]


def test_tmp_shm_and_scratch_are_per_node_and_the_shared_directory_is_common(cluster):
    a, b, _ = cluster.nodes
    marker = f"from-a-{os.getpid()}"
    a.run(["sh", "-c", f"echo {marker} > /tmp/m && echo {marker} > /dev/shm/m && echo {marker} > {a.scratch}/m && echo {marker} > {cluster.shared}/m"])
    assert b.run(["sh", "-c", f"ls /tmp/m /dev/shm/m {b.scratch}/m 2>&1; cat {cluster.shared}/m"], check=False).stdout.count("No such file") == 3
    assert marker in b.run(["cat", str(cluster.shared / "m")]).stdout
    assert (cluster.shared / "m").read_text().strip() == marker  # the host sees the cluster filesystem too
    assert not os.path.exists("/dev/shm/m") or open("/dev/shm/m").read().strip() != marker
    assert (cluster.root / "nodes" / "node1" / "scratch" / "m").read_text().strip() == marker  # node1's own scratch
    assert not (cluster.root / "nodes" / "node2" / "scratch" / "m").exists()


SERVE = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", 7001)); s.listen()
print("listening", flush=True)
while True:
    c, _ = s.accept(); c.sendall(socket.gethostname().encode()); c.close()
"""

CONNECT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], 7001), timeout=float(sys.argv[2])) as c:
        print("reached", c.recv(64).decode())
except OSError as e:
    print("failed", type(e).__name__)
"""


def _connect(node, host: str, timeout: float = 2.0) -> str:
    return node.run([PY, "-c", CONNECT, host, str(timeout)], timeout=30).stdout.strip()


def test_nodes_reach_each_other_but_nothing_outside_and_a_cut_link_is_silence(cluster):
    a, b, c = cluster.nodes
    server = a.popen([PY, "-c", SERVE], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "listening"
        assert _connect(b, "node1") == "reached node1"
        # No route out of the cluster: not to the host's own address, not to the internet.
        host_address = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
        for outside in [*host_address[:1], "8.8.8.8"]:
            assert _connect(b, outside).startswith("failed"), outside
        cluster.cut(a)
        started = time.monotonic()
        assert _connect(b, "node1", timeout=1.0) == "failed TimeoutError"  # dropped, not refused: a partition
        assert time.monotonic() - started >= 0.9
        assert _connect(c, "node1", timeout=1.0) == "failed TimeoutError"
        cluster.restore(a)
        assert _connect(b, "node1", timeout=10.0) == "reached node1"
    finally:
        cluster.restore(a)
        kill_group(server)
        server.wait()


def test_kill_all_is_a_power_loss_of_one_node(cluster):
    _, b, c = cluster.nodes
    # A process tree that left its session (a daemon): still part of the node, still killed.
    runner = b.popen(["sh", "-c", "setsid sleep 300 & sleep 300"])
    neighbour = c.popen(["sleep", "300"])
    b.run(["sh", "-c", "echo x > /tmp/kept"])
    deadline = time.monotonic() + 10
    while len(b.processes()) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    victims = b.processes()
    assert len(victims) >= 3, victims
    b.kill_all()
    assert runner.wait(timeout=10) == -signal.SIGKILL
    assert not [pid for pid in victims if os.path.exists(f"/proc/{pid}")]
    assert not b.up and neighbour.poll() is None  # the other nodes are untouched
    with pytest.raises(RuntimeError, match="is down"):
        b.run(["true"])
    b.boot()  # a reboot: tmpfs contents are gone, the shared directory is not
    assert b.run(["test", "!", "-e", "/tmp/kept"], check=False).returncode == 0
    assert py(b, "import socket; print(socket.gethostname())").strip() == "node2"
    kill_group(neighbour)
    neighbour.wait()


def test_the_rsh_agent_runs_a_command_on_another_node_with_its_status(cluster):
    a, b, _ = cluster.nodes
    agent = str(cluster.rsh_agent)
    result = a.run([agent, "node2", "echo", "on", "$(hostname)", ";", "exit", "3"], check=False)
    assert (result.returncode, result.stdout.strip()) == (3, "on node2")
    assert a.run([agent, b.address, "cat", str(cluster.shared / "m")]).returncode == 0


def _our_namespaces(prefix: str) -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in listing.splitlines() if line.startswith(prefix)]


def test_close_leaves_nothing_and_a_killed_sessions_leftovers_are_removed(tmp_path):
    with Cluster(2) as c:
        sleeper = c.nodes[1].popen(["sleep", "300"])
        inits = [n._init_pid for n in c.nodes]
        root, prefix = c.root, c.prefix
        assert len(_our_namespaces(prefix)) == 3  # two nodes and the switch
    assert _our_namespaces(prefix) == [] and not root.exists()
    assert sleeper.wait(timeout=10) == -signal.SIGKILL and not any(os.path.exists(f"/proc/{pid}") for pid in inits)

    # A session SIGKILLed with its cluster up: its nodes die with it (lifeline), its namespaces go at the next start.
    script = tmp_path / "crash.py"
    script.write_text(
        f"import sys, time; sys.path.insert(0, {str(REPO)!r})\n"
        "from tests.cluster import Cluster\n"
        "c = Cluster(2).start(); c.nodes[0].popen(['sleep', '300'])\n"
        "print(c.prefix, c.root, *(n._init_pid for n in c.nodes), flush=True); time.sleep(300)\n"
    )
    crashed = subprocess.Popen([PY, str(script)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    prefix, root, *init_pids = crashed.stdout.readline().split()
    os.killpg(crashed.pid, signal.SIGKILL)
    crashed.wait()
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{pid}") for pid in init_pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in init_pids), "the nodes outlived their session"
    assert len(_our_namespaces(prefix)) == 3
    with Cluster(2):
        assert _our_namespaces(prefix) == [] and not os.path.exists(root)
