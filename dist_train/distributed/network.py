"""Which network interface gloo uses, decided before the first process group exists (groups.py asks).

Every gloo group (the default one on CPU, the control and checkpoint side groups on GPU too, DeepSpeed's
and DCP's own) binds to, and tells its peers, the address this machine's hostname resolves to, unless
GLOO_SOCKET_IFNAME names interfaces (torch's ProcessGroupGloo reads it each time a group is made). A
hostname that resolves to a loopback address (Debian and Ubuntu install `127.0.1.1 HOSTNAME` in /etc/hosts;
a hostname that does not resolve makes gloo fall back to 127.0.0.1) is fine on one machine and fatal across
machines: the peers connect to 127.0.1.1, which is themselves ("Gloo connectFullMesh failed ... remote=
[127.0.1.1]", or a wait until the collective timeout).

We pick the interface rather than refuse: the rendezvous already proved a path between the nodes, and the
interface this machine routes the rendezvous address through (or, on the node that hosts it, the only
non-loopback interface that is up) is on that path, so the job runs where it would otherwise fail, and one
line says what was chosen and how to choose otherwise. Only where that is ambiguous (the rendezvous host
with several interfaces up) do we refuse, naming GLOO_SOCKET_IFNAME and the candidates: a wrong guess there
could be a slow management network. NCCL is left alone: it picks its socket interface itself and skips `lo`
(NCCL_SOCKET_IFNAME overrides it), so a loopback hostname does not affect it.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Mapping, Optional

from .environment import DistEnv, MachineError

GLOO_SOCKET_IFNAME = "GLOO_SOCKET_IFNAME"
_SIOCGIFFLAGS, _SIOCGIFADDR = 0x8913, 0x8915
_IFF_UP, _IFF_LOOPBACK = 0x1, 0x8


@dataclass(frozen=True)
class Interface:
    name: str
    address: str  # its (primary) IPv4 address
    up: bool
    loopback: bool


def interfaces() -> list[Interface]:
    """This machine's interfaces that have an IPv4 address (Linux ioctls; empty elsewhere)."""
    found = []
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name in names:
            request = struct.pack("256s", name.encode()[:15])
            try:
                address = socket.inet_ntoa(fcntl.ioctl(s.fileno(), _SIOCGIFADDR, request)[20:24])
                flags = struct.unpack("H", fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, request)[16:18])[0]
            except OSError:
                continue  # no IPv4 address
            found.append(Interface(name, address, bool(flags & _IFF_UP), bool(flags & _IFF_LOOPBACK)))
    return found


def hostname_address() -> Optional[str]:
    """The IPv4 address gloo would bind to by default: what this machine's hostname resolves to (None: nothing)."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return None


def _route_source(host: str, port: int) -> Optional[str]:
    """The local address this machine sends to HOST from (a UDP connect sends nothing)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, port))
            return s.getsockname()[0]
    except OSError:
        return None


def _is_loopback(address: Optional[str]) -> bool:
    return address is None or ipaddress.ip_address(address).is_loopback


def _rendezvous_on_loopback(master_addr: str, hostname: str) -> bool:
    """The rendezvous is this machine's loopback (`127.0.0.1`, `localhost`, a name mapped to it): every rank
    reached it there, so every rank is on this machine (several "nodes" of one host: pods, emulated nodes).
    This machine's own hostname does not count: resolving to loopback here is the very trap, and peers on
    other machines resolve it to this machine's real address."""
    if master_addr.split(".")[0] == hostname.split(".")[0]:
        return False
    try:
        return _is_loopback(socket.gethostbyname(master_addr))
    except OSError:
        return False


def choose_gloo_interface(dist_env: DistEnv, environ: Mapping[str, str]) -> Optional[tuple[str, str]]:
    """(interface, the line that says so) when gloo must be told which interface to use, else None.

    Raises MachineError when the job spans machines, the hostname resolves to loopback, and which interface
    reaches the other nodes cannot be told."""
    if environ.get(GLOO_SOCKET_IFNAME) or dist_env.world_size <= dist_env.local_world_size:
        return None  # the user chose, or every rank is on this machine (where loopback is right)
    hostname, address = socket.gethostname(), hostname_address()
    if not _is_loopback(address) or _rendezvous_on_loopback(dist_env.master_addr, hostname):
        return None
    candidates = [i for i in interfaces() if i.up and not i.loopback]
    source = _route_source(dist_env.master_addr, dist_env.master_port)
    chosen = next((i for i in candidates if i.address == source), None) if not _is_loopback(source) else None
    why = f"the interface towards the rendezvous host {dist_env.master_addr}"
    if chosen is None and len(candidates) == 1:
        # This machine hosts the rendezvous (its name is loopback here too): its only interface out.
        chosen, why = candidates[0], "the only interface up besides loopback"
    resolved = f"resolves to {address} (loopback)" if address else "does not resolve (gloo falls back to 127.0.0.1)"
    if chosen is None:
        names = ", ".join(f"{i.name} ({i.address})" for i in candidates) or "none is up"
        raise MachineError(
            f"hostname {hostname} {resolved}, which ranks on the other {dist_env.num_nodes - 1} node(s) cannot reach, and "
            f"which interface reaches them is ambiguous: set {GLOO_SOCKET_IFNAME} (and NCCL_SOCKET_IFNAME on GPUs) to "
            f"the interface the nodes share, one of {names}; or map {hostname} to that interface's address in /etc/hosts"
        )
    line = (
        f"hostname {hostname} {resolved}, which other nodes cannot reach: gloo uses {chosen.name} ({chosen.address}), "
        f"{why}; set {GLOO_SOCKET_IFNAME} to choose another"
    )
    return chosen.name, line
