"""The edge's listening group: N SO_REUSEPORT sockets on one port, one per worker, steered by client network.

Why: per-IP connection caps and per-/24 rate limits are counted inside one
worker process. They hold exactly only if every connection from one client
network reaches the same worker, so the kernel must not spread connections
by its default 4-tuple hash. A classic BPF program attached with
SO_ATTACH_REUSEPORT_CBPF picks the socket instead: its return value is the
index of the socket in the group (the order the sockets started listening),
computed from the source /24 (IPv4) or /64 (IPv6) only.

The program (`reuseport_program`) and `worker_for` do the same arithmetic:
key = source & 0xffffff00 (IPv4) or word0 ^ word1 of the source /64 (IPv6);
index = ((key * 0x9E3779B1) mod 2**32 >> 16) % count.

Verified against the kernel (Linux 6.18, tests/edge/test_reuseport.py, and
net/core/sock_reuseport.c run_bpf_filter): the program runs on the SYN with
skb->data past the TCP header, so addresses are loaded relative to the
network header (SKF_NET_OFF). A socket bound to "::" with IPV6_V6ONLY=0 sees
IPv4 clients as IPv4 packets, so the program reads the version nibble and
handles both families; `worker_for` maps IPv4-mapped addresses to IPv4 to
match. An index the group does not have would fall back to the kernel hash;
`% count` rules that out once all `count` sockets listen. Closing a socket
of the group moves the last one into its slot (seen on 6.18), so the
supervisor keeps its copy of every socket open for the group's lifetime: a
worker that dies must not reorder the group.
"""

import ctypes
import socket
import struct

from relay.edge.connections import parse_ip

SO_ATTACH_REUSEPORT_CBPF = 51
SKF_NET_OFF = -0x100000
GOLDEN = 0x9E3779B1

# classic BPF opcodes (linux/bpf_common.h)
LD_W_ABS, LD_B_ABS = 0x20, 0x30
ALU_AND_K, ALU_RSH_K, ALU_MUL_K, ALU_MOD_K, ALU_XOR_X = 0x54, 0x74, 0x24, 0x94, 0xAC
JMP_JA, JMP_JEQ_K = 0x05, 0x15
MISC_TAX, RET_A = 0x07, 0x16


def _net(offset: int) -> int:
    """The k of a load at `offset` bytes into the network header (a u32 in struct sock_filter)."""
    return (SKF_NET_OFF + offset) & 0xFFFFFFFF


def reuseport_program(count: int) -> bytes:
    """The packed struct sock_filter array returning the group index for a packet's source network."""
    _check_count(count)
    program = [  # (code, jt, jf, k)
        (LD_B_ABS, 0, 0, _net(0)),  # A = version nibble
        (ALU_RSH_K, 0, 0, 4),
        (JMP_JEQ_K, 3, 0, 6),  # IPv6: skip the IPv4 block
        (LD_W_ABS, 0, 0, _net(12)),  # IPv4 source
        (ALU_AND_K, 0, 0, 0xFFFFFF00),  # its /24
        (JMP_JA, 0, 0, 4),  # to the mix
        (LD_W_ABS, 0, 0, _net(8)),  # IPv6 source, first half of the /64
        (MISC_TAX, 0, 0, 0),
        (LD_W_ABS, 0, 0, _net(12)),  # second half
        (ALU_XOR_X, 0, 0, 0),
        (ALU_MUL_K, 0, 0, GOLDEN),  # the mix
        (ALU_RSH_K, 0, 0, 16),
        (ALU_MOD_K, 0, 0, count),
        (RET_A, 0, 0, 0),
    ]
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in program)


def worker_for(address: str, count: int) -> int:
    """The group index the kernel program picks for a client at `address` (IPv4 or IPv6 text)."""
    _check_count(count)
    ip = parse_ip(address)
    if ip is None:
        raise ValueError(f"not an IP address: {address!r}")
    if ip.version == 4:
        key = int(ip) & 0xFFFFFF00
    else:
        key = int.from_bytes(ip.packed[0:4], "big") ^ int.from_bytes(ip.packed[4:8], "big")
    return (((key * GOLDEN) & 0xFFFFFFFF) >> 16) % count


def listen_group(host: str, port: int, count: int, backlog: int) -> list[socket.socket]:
    """`count` non-blocking, non-inheritable listening sockets on (host, port), socket k for worker k.

    With port 0 the first socket's port is used for the rest. Raises OSError
    saying which step failed, after closing every socket made.
    """
    _check_count(count)
    group: list[socket.socket] = []
    step = f"resolving {host!r}"
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        for index in range(count):
            step = f"making listening socket {index} of {count} on {host!r} port {address[1]}"
            sock = socket.socket(family, socket.SOCK_STREAM)  # non-inheritable by default (PEP 446)
            group.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6 and address[0] == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            if index == 0 and count > 1:
                step = "attaching the reuseport program (the kernel refused it)"
                _attach_program(sock, count)
                step = f"making listening socket 0 of {count} on {host!r} port {address[1]}"
            sock.bind(address)
            address = (address[0], sock.getsockname()[1], *address[2:])
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError as error:
        for sock in group:
            sock.close()
        raise OSError(error.errno, f"{step}: {error.strerror}") from error
    return group


def _attach_program(sock: socket.socket, count: int) -> None:
    """Attach the program to the group's first socket (before bind, as the kernel's selftests do)."""
    program = reuseport_program(count)
    filters = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("@HP", len(program) // 8, ctypes.addressof(filters))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)  # the kernel copies `filters` here


def _check_count(count: int) -> None:
    if count < 1:
        raise ValueError(f"a listening group needs at least one socket, not {count}")
