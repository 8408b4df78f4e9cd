"""PID 1 of one emulated node (tests/cluster.py): sets the node up from inside its namespaces, then reaps.

Started by the cluster as `nsenter --net=/run/netns/NETNS unshare --mount --uts --ipc --pid --fork
--mount-proc --propagation private python node_init.py SPEC_JSON`, so it already has the node's network, and
fresh mount, UTS, IPC and PID namespaces of its own. It gives the node its hostname, its /etc/hosts (a bind
mount of the file the cluster wrote), a /sys that shows the node's network devices (with the host's cgroup
tree kept: slurmd refuses to start without one), an empty /tmp and /dev/shm (tmpfs), the shared directories
at the same paths as on the host, and its scratch directory; then prints "ready" and stays as the node's init. It imports nothing of
the project: it runs before the node can see anything but what is mounted.

The node lives exactly as long as this process. It exits when its lifeline (a pipe whose write end only the
test process holds) reaches EOF, i.e. when the test process ends in any way, SIGKILL included; a PID
namespace whose init exits takes every process in it along (the kernel SIGKILLs them), so no node outlives
the session that made it.
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import subprocess
import sys


def mount(*args: str, fds: tuple[int, ...] = ()) -> None:
    # --no-canonicalize: mount(8) would resolve /proc/self/fd/N to a path name, which the tmpfs now hides.
    subprocess.run(["mount", "--no-canonicalize", *args], check=True, pass_fds=fds)


def set_up(spec: dict) -> None:
    socket.sethostname(spec["hostname"])
    mount("--bind", spec["hosts_file"], "/etc/hosts")
    # sysfs shows the network devices of the namespace that mounts it (what `ip netns exec` does, which
    # would also lose the cgroup mounts under /sys).
    cgroups = os.open("/sys/fs/cgroup", os.O_PATH | os.O_DIRECTORY) if os.path.isdir("/sys/fs/cgroup") else None
    mount("-t", "sysfs", "sysfs", "/sys")
    if cgroups is not None:
        mount("--rbind", f"/proc/self/fd/{cgroups}", "/sys/fs/cgroup", fds=(cgroups,))
        os.close(cgroups)
    # The shared directories may lie under /tmp (pytest's tmp_path), which the private tmpfs is about to
    # cover: hold each by an O_PATH descriptor and bind it back at its own path once /tmp is the node's.
    # Parents before children, so that a directory shared inside another one is not hidden by it.
    held = [(os.open(path, os.O_PATH | os.O_DIRECTORY), path) for path in sorted(spec["shared"], key=lambda p: p.count("/"))]
    scratch = os.open(spec["scratch"], os.O_PATH | os.O_DIRECTORY) if spec.get("scratch") else None
    mount("-t", "tmpfs", "-o", "mode=1777", "tmpfs", "/tmp")
    mount("-t", "tmpfs", "-o", "mode=1777" + (f",size={spec['shm_size']}" if spec.get("shm_size") else ""), "tmpfs", "/dev/shm")
    for fd, path in held:
        os.makedirs(path, exist_ok=True)
        mount("--bind", f"/proc/self/fd/{fd}", path, fds=(fd,))
        os.close(fd)
    if scratch is not None:
        # Every node finds its own scratch at the same path, as /scratch on a real cluster.
        mount("--bind", f"/proc/self/fd/{scratch}", spec["scratch_mount"], fds=(scratch,))
        os.close(scratch)


def reap_until_lifeline_closes(lifeline: int) -> None:
    while True:
        readable, _, _ = select.select([lifeline], [], [], 0.5)
        if readable and os.read(lifeline, 1) == b"":
            return
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass  # orphans of the node (daemons, job steps) are reparented to us: reap them
        except ChildProcessError:
            pass
        except OSError as e:
            if e.errno != errno.EINTR:
                raise


def main() -> None:
    spec = json.loads(sys.argv[1])
    set_up(spec)
    print("ready", flush=True)
    reap_until_lifeline_closes(int(spec["lifeline_fd"]))


if __name__ == "__main__":
    main()
