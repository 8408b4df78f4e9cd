"""Multi-node training on the emulated cluster (tests/cluster.py): two nodes, each its own host, a shared directory.

- torchrun with c10d rendezvous, 2 nodes x 1 process: DDP, FSDP2 and DeepSpeed ZeRO-2 end bit-identical to
  2 processes on one host (one launch trains all three);
- `dist-train launch --nnodes 2 --node-rank K` on each node, 2 nodes x 2 processes x 2 DataLoader workers, one
  epoch: bit-identical to 4 processes on one host; each node reads every shard of the split exactly once
  (strace on each node), from a node store in that node's own /dev/shm, which is gone at the end;
- mpirun across the two nodes (launch/mpirun.sh; Open MPI's ssh replaced by the cluster's agent): as torchrun.

And what a real cluster does wrong, caught before training (one line, exit 2) or handled:
- an output_dir that is each node's own directory (the reproduced bug: node B crashed at the first checkpoint
  with a raw FileNotFoundError, after the training was done);
- a hostname that resolves to 127.0.1.1 (Debian's /etc/hosts) on nodes whose peers are elsewhere: gloo is told
  the interface, and says so;
- data.download=true on every rank of every node: one download per data root, never two writers;
- ranks of one node that would choose different folders for the node store (their own TMPDIR).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from tests.cluster import Cluster, unavailable
from tests.engines import open_mpi_missing
from tests.procs import REPO, WORKERS, assert_same_parameters, final_model, kill_group

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.skipif(bool(unavailable()), reason=unavailable() or "n/a")]

PY = sys.executable
TORCHRUN = [PY, "-m", "torch.distributed.run"]
STRATEGIES = ["ddp", "fsdp2", "deepspeed"]
# 3 steps of the quickstart MLP; global batch 64 = micro 32 x 2 ranks; a checkpoint at the end (on the shared disk).
SCENARIO = ["mlp_digits.yaml", "none", ",".join(STRATEGIES), "train.max_steps=3", "train.log_interval=1"]
# One epoch (22 steps) at 4 ranks: global batch 64 = micro 16 x 4 ranks; 2 DataLoader workers per rank.
EPOCH = ["configs/mlp_digits.yaml", "train.epochs=1", "train.micro_batch_size=16", "data.num_workers=2", "train.progress_bar=false", "train.log_interval=11"]
SHORT = ["configs/linear_regression.yaml", "train.max_steps=2", "train.progress_bar=false", "strategy.timeout_seconds=30"]
_PORTS = iter(range(29400, 29500))


@pytest.fixture(scope="module")
def cluster():
    with Cluster(2) as c:
        yield c


def torchrun_on_nodes(nodes, nproc: int, args: list) -> list[tuple]:
    """The same torchrun command on every node, c10d rendezvous on the first."""
    port = next(_PORTS)
    rendezvous = ["--nnodes", str(len(nodes)), "--nproc_per_node", str(nproc), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{nodes[0].hostname}:{port}", "--rdzv_id", f"job{port}"]
    return [(node, [*TORCHRUN, *rendezvous, *args]) for node in nodes]


def no_dist_train_traceback(output: str) -> bool:
    """torchrun's agents print their own tracebacks when a worker fails; dist_train's code must not be in one."""
    return f'File "{REPO / "dist_train"}' not in output


# ---------------------------------------------------------------- the same model on one host and on two


@pytest.fixture(scope="module")
def one_host(cluster) -> Path:
    """The three strategies, 2 processes on node1 alone."""
    out = cluster.shared / "one-host-2"
    cluster.nodes[0].run([*TORCHRUN, "--standalone", "--nproc_per_node", "2", WORKERS / "strategy_scenarios.py", out, *SCENARIO], timeout=300)
    return out


def test_torchrun_two_nodes_of_one_process_match_one_host_for_every_strategy(cluster, one_host):
    out = cluster.shared / "two-nodes-1"
    cluster.run_together(torchrun_on_nodes(cluster.nodes, 1, [WORKERS / "strategy_scenarios.py", out, *SCENARIO]), timeout=300)
    for name in STRATEGIES:
        assert_same_parameters(final_model(one_host / f"{name}-straight"), final_model(out / f"{name}-straight"))
        assert sorted((out / f"{name}-straight" / "checkpoints").glob("step-00000003/COMPLETE")), name


def _dist_train_launch(node, node_rank: int, port: int, out: Path, trace: Path) -> tuple:
    launch = [PY, "-m", "dist_train", "launch", "--nproc-per-node", "2", "--nnodes", "2", "--node-rank", str(node_rank), "--rdzv-endpoint", f"node1:{port}", "--rdzv-id", "launch"]
    # seccomp-bpf: only the traced calls stop the process, so the training runs at nearly full speed.
    # -ff: one file per thread, so no call is split into "unfinished" and "resumed" halves.
    strace = ["strace", "-ff", "-qq", "--seccomp-bpf", "-y", "-e", "trace=read,pread64,readv,preadv,openat", "-o", trace]
    return node, [*strace, *launch, *EPOCH, f"output_dir={out}"]


def shard_reads(trace: Path) -> tuple[Counter, set]:
    """Bytes read per train shard file, and the node-store folders opened, in one node's strace output (TRACE.<tid> files)."""
    read_bytes: Counter = Counter()
    folders = set()
    lines = [line for part in trace.parent.glob(f"{trace.name}.*") for line in part.read_text(errors="replace").splitlines()]
    for line in lines:
        call = re.search(r"\b(?:p?readv?|pread64)\(\d+<([^>]*/train-\d+\.tar)>.*\)\s+=\s+(\d+)$", line)
        if call:
            read_bytes[Path(call.group(1)).name] += int(call.group(2))
        folder = re.search(r'openat\(.*"(/dev/shm/dist_train-[^/"]+)', line)
        if folder:
            folders.add(folder.group(1))
    return read_bytes, folders


def test_dist_train_launch_two_nodes_of_two_processes_read_each_shard_once_per_node(cluster):
    a, b = cluster.nodes
    reference = cluster.shared / "one-host-4"
    a.run([PY, "-m", "dist_train", "launch", "--nproc-per-node", "4", *EPOCH, f"output_dir={reference}"], timeout=300)
    out, port = cluster.shared / "launch-2x2", next(_PORTS)
    traces = [cluster.shared / f"strace-{node.name}.txt" for node in (a, b)]
    results = cluster.run_together([_dist_train_launch(node, k, port, out, trace) for k, (node, trace) in enumerate(zip((a, b), traces))], timeout=400)
    text = "".join(r.output for r in results)
    assert "dist-train launch:" in results[1].output and "--node_rank 1" in results[1].output
    assert text.count("local_rank=1 node=1/2") == 1 and "done: 22 optimizer steps" in text, text[-3000:]
    assert_same_parameters(final_model(reference), final_model(out))

    manifest = json.loads((REPO / "data" / "digits" / "train" / "manifest.json").read_text())
    sizes = {shard["name"]: shard["bytes"] for shard in manifest["shards"]}
    node_folders = []
    for node, trace in zip((a, b), traces):
        read_bytes, folders = shard_reads(trace)
        assert dict(read_bytes) == sizes, f"{node.name} read {dict(read_bytes)}, the split is {sizes}"  # each shard once, whole
        # One store per node, named after the node's first rank; each node's in its own /dev/shm, gone at the end.
        assert len({re.sub(r"-e\d+-s\d+-p\d+$", "", f) for f in folders}) == 1, folders
        node_folders.append(folders)
        assert not [f for f in node.run(["ls", "-A", "/dev/shm"]).stdout.split() if f.startswith("dist_train-")]
    assert not node_folders[0] & node_folders[1]
    assert not [f for f in node_folders[0] | node_folders[1] if Path(f).exists()]  # never in the host's /dev/shm


@pytest.mark.skipif(bool(open_mpi_missing()), reason=open_mpi_missing() or "n/a")
def test_mpirun_across_two_nodes_matches_one_host(cluster, one_host):
    a, _ = cluster.nodes
    hostfile = cluster.shared / "mpi-hosts"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    out = cluster.shared / "mpirun-2"
    env = {
        "PYTHON": PY, "HOSTFILE": str(hostfile), "MASTER_ADDR": "node1",
        # ssh is the cluster's agent; no tree spawn (each remote daemon started from node1, not by another).
        "MPIRUN_ARGS": f"--mca plm_rsh_agent {cluster.rsh_agent} --mca plm_rsh_no_tree_spawn 1",
        "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    }  # fmt: skip
    preset, _, _, *overrides = SCENARIO
    result = a.run(["bash", "launch/mpirun.sh", "2", f"configs/{preset}", *overrides, "train.progress_bar=false", f"output_dir={out}"], env=env, timeout=300)
    assert "launcher=mpi rank=0/2 local_rank=0 node=0/2" in result.output and "launcher=mpi rank=1/2 local_rank=0 node=1/2" in result.output, result.output[-3000:]
    assert_same_parameters(final_model(one_host / "ddp-straight"), final_model(out))


# ---------------------------------------------------------------- what a real cluster does wrong


def test_an_output_dir_that_is_each_nodes_own_is_refused_before_training(cluster):
    results = cluster.run_together(torchrun_on_nodes(cluster.nodes, 1, ["-m", "dist_train", "train", *SHORT, "output_dir=/tmp/run"]), timeout=180, check=False)
    text = "".join(r.output for r in results)
    assert all(r.returncode != 0 for r in results) and "exitcode  : 2" in text, text[-4000:]
    lines = [line for line in text.splitlines() if line.startswith("dist-train:")]
    assert len(lines) == 1, text[-4000:]
    assert re.fullmatch(
        r"dist-train: config error: output_dir=/tmp/run is not the same directory on every node: node(1|2) \(rank 1\) cannot see what "
        r"rank 0 wrote there on node(1|2); output_dir must be on a filesystem every node shares .*", lines[0]
    ), lines[0]
    assert no_dist_train_traceback(text) and "step " not in text, text[-4000:]
    for node in cluster.nodes:  # nothing left behind: rank 0 made the directory and took its token away again
        assert node.run(["sh", "-c", "ls -A /tmp/run 2>/dev/null || true"]).stdout.strip() == ""


def test_a_hostname_that_resolves_to_loopback_gets_the_interface_towards_the_other_nodes(tmp_path):
    with Cluster(2, loopback_hostname=True) as trap:
        out = trap.shared / "out"
        results = trap.run_together(torchrun_on_nodes(trap.nodes, 1, ["-m", "dist_train", "train", *SHORT, f"output_dir={out}"]), timeout=180)
        text = "".join(r.output for r in results)
        for node in trap.nodes:
            assert re.search(
                rf"dist-train: hostname {node.hostname} resolves to 127\.0\.1\.1 \(loopback\), which other nodes cannot reach: "
                rf"gloo uses eth0 \({re.escape(node.address)}\), the .*; set GLOO_SOCKET_IFNAME to choose another", text
            ), text[-4000:]
        assert "done: 2 optimizer steps" in text
        # The node hosting the rendezvous, with a second interface up: which one the peers reach is a guess, so refused.
        a = trap.nodes[0]
        a.run(["sh", "-c", "ip link add eth1 type veth peer name eth1-peer && ip addr add 10.99.0.1/24 dev eth1 && ip link set eth1-peer up && ip link set eth1 up"])
        probe = textwrap.dedent("""
            import os
            from dist_train.distributed.environment import DistEnv, MachineError
            from dist_train.distributed.network import choose_gloo_interface
            job = DistEnv(world_size=2, local_world_size=1, num_nodes=2, master_addr="node1", master_port=29400)
            print(choose_gloo_interface(job, {"GLOO_SOCKET_IFNAME": "eth0"}), choose_gloo_interface(DistEnv(world_size=2, local_world_size=2), {}),
                  *(choose_gloo_interface(DistEnv(world_size=2, local_world_size=1, num_nodes=2, master_addr=m), {}) for m in ("127.0.0.1", "localhost")))
            from dist_train.errors import classify
            try:
                choose_gloo_interface(job, os.environ)
            except MachineError as e:
                print(e)
                print(*classify(e)[::2])  # said by the ranks of this machine (not only rank 0), exit 2
        """)
        shown = a.run([PY, "-c", probe]).stdout.splitlines()
        # Set by the user, or every rank on this machine (one launch, or "nodes" whose rendezvous is loopback): left alone.
        assert shown[0] == "None None None None"
        assert "hostname node1 resolves to 127.0.1.1 (loopback)" in shown[1] and "set GLOO_SOCKET_IFNAME" in shown[1]
        assert "eth0 (" in shown[1] and "eth1 (10.99.0.1)" in shown[1]
        assert shown[2] == "launch error on this machine 2"


MIRROR = """
import http.server, sys, time
class Slow(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        time.sleep(0.5)  # a real download takes a while: long enough for processes without a lock to overlap
        super().do_GET()
server = http.server.ThreadingHTTPServer((sys.argv[1], 8080), lambda *a: Slow(*a, directory=sys.argv[2]))
print("ready", flush=True)
server.serve_forever()
"""


def _write_idx_mirror(folder: Path) -> dict[str, int]:
    """MNIST's four gzipped idx files (16 train, 8 test images of 28x28), for /mnist/ and /fashion/."""
    import gzip
    import struct

    import numpy as np

    rng = np.random.default_rng(0)
    files = {}
    for split, n in (("train", 16), ("t10k", 8)):
        files[f"{split}-images-idx3-ubyte.gz"] = struct.pack(">IIII", 2051, n, 28, 28) + rng.integers(0, 256, (n, 28, 28), dtype=np.uint8).tobytes()
        files[f"{split}-labels-idx1-ubyte.gz"] = struct.pack(">II", 2049, n) + rng.integers(0, 10, n, dtype=np.uint8).tobytes()
    for sub in ("mnist", "fashion"):
        (folder / sub).mkdir(parents=True)
        for name, payload in files.items():
            (folder / sub / name).write_bytes(gzip.compress(payload))
    return {"train": 16, "test": 8}


def test_data_download_on_every_rank_downloads_once_per_data_root(cluster):
    a, b = cluster.nodes
    mirror_dir = cluster.shared / "mirror"
    _write_idx_mirror(mirror_dir)
    server = a.popen([PY, "-c", MIRROR, a.address, mirror_dir], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        worker = [PY, WORKERS / "torchvision_download.py", f"http://{a.address}:8080", "/tmp/mnist", cluster.shared / "fashion", cluster.shared / "barrier", "4"]
        results = cluster.run_together([(node, worker) for node in (a, a, b, b)], env={"no_proxy": "*"}, timeout=120)
    finally:
        kill_group(server)  # the server and the nsenter in front of it
        _, log = server.communicate()
    for result in results:
        assert result.stdout.split("\n")[:2] == ["mnist: 16 train, 8 test", "fashion_mnist: 16 train, 8 test"], result.output[-3000:]
    gets = Counter(re.findall(r'"GET (/\S+) HTTP', log))
    downloads = {path: count / 2 for path, count in gets.items()}  # torchvision GETs twice: a redirect probe, then the file
    files = [p.name for p in (mirror_dir / "mnist").iterdir()]
    # data.path=/tmp/mnist is each node's own: one download per node; the shared one: one download in all.
    assert downloads == {**{f"/mnist/{f}": 2 for f in files}, **{f"/fashion/{f}": 1 for f in files}}, log[-3000:]


def test_the_ranks_of_a_node_share_one_node_store_whatever_folder_each_would_choose():
    """/dev/shm too small for the store (a container's 64 MB; here 1 MB against 4 decoded shards of 100 64x64
    images) and a TMPDIR per rank: each rank would take its own temp folder, so the node's store would split
    in two, each half reading every shard and never deleted (each waits for consumers that use the other)."""
    import torch

    from dist_train.data.shards import write_split
    from dist_train.data.sources import Split
    from tests.test_data_scale import manifest_totals

    g = torch.Generator().manual_seed(0)
    with Cluster(1, shm_size="1m") as one:
        root = one.shared / "shards"
        for name, n in (("train", 200), ("test", 37)):
            split = Split(torch.randint(0, 256, (n, 1, 64, 64), generator=g, dtype=torch.uint8), torch.randint(0, 10, (n,), generator=g), [f"{name}-{i:04d}" for i in range(n)])
            write_split(split, root / "clean" / name, name, "image", 10, 100, 20, {})
        out = one.shared / "reads"
        out.mkdir()
        env = {"PYTHONPATH": f"{REPO / 'tests' / 'rank_tmpdir'}:{REPO}"}
        node = one.nodes[0]
        node.run([*TORCHRUN, "--standalone", "--nproc_per_node", "2", WORKERS / "stream_reads.py", root, out, "clean"], env=env, timeout=240)
        ranks = [json.loads((out / f"rank-{r}.json").read_text())["clean"] for r in range(2)]
        records, size = manifest_totals(root / "clean")
        assert (sum(r["decoded_records"] for r in ranks), sum(r["bytes_read"] for r in ranks)) == (records, size)
        left = node.run(["sh", "-c", "ls -A /tmp/rank-0 /tmp/rank-1 /dev/shm"]).stdout
        assert "dist_train-" not in left, left
