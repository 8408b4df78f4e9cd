"""`ssh HOST COMMAND` for the emulated cluster (tests/cluster.py): runs COMMAND on node HOST.

  node_rsh.py SOCKET HOST COMMAND...      (what Open MPI's `--mca plm_rsh_agent` calls, after the socket)

A process inside one node cannot enter another node's namespaces (a PID namespace can only be entered from
an ancestor), so, as ssh asks sshd, this asks the cluster: it sends HOST, the command line (its words joined
by spaces, as ssh does, for the remote shell to split) and its own stdin, stdout and stderr (SCM_RIGHTS) over
a Unix socket the cluster serves from the host. The remote command writes straight to our descriptors; we
wait for its exit status and exit with it (255 if the cluster went away, as ssh does). If we are killed,
the cluster sees the connection close and kills the remote command's process group.
"""

from __future__ import annotations

import json
import socket
import sys


def main() -> int:
    if len(sys.argv) < 4:
        print("usage: node_rsh.py SOCKET HOST COMMAND...", file=sys.stderr)
        return 255
    path, host, command = sys.argv[1], sys.argv[2], " ".join(sys.argv[3:])
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(path)
        socket.send_fds(conn, [json.dumps({"host": host, "command": command}).encode() + b"\n"], [0, 1, 2])
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = conn.recv(64)
            if not chunk:
                return 255
            reply += chunk
    answer = json.loads(reply)
    if "error" in answer:
        print(f"node_rsh: {answer['error']}", file=sys.stderr)
        return 255
    return int(answer["status"])


if __name__ == "__main__":
    sys.exit(main())
