"""Hostile code trying to reach a network.

No packet leaves this machine: the only outside address used is 192.0.2.1
(TEST-NET-1, never routed) and 2001:db8::1 (the IPv6 documentation prefix),
each to show that a send fails at once; everything else is loopback.

"At once" is shown without a clock: the sockets are non-blocking, so a send or
connect that had a route would return EINPROGRESS (or succeed) and leave a packet
to wait on; ENETUNREACH from the syscall itself means the kernel refused it before
anything was sent, so there is nothing to time out on.
"""

from __future__ import annotations

import secrets
import socket
import threading

import pytest

from .conftest import assert_healthy, inside

PRELUDE = """
import json, os, socket
def lo_tx():
    for line in open('/proc/net/dev'):
        if line.strip().startswith('lo:'):
            f = line.split(':', 1)[1].split()
            return int(f[9])  # transmitted packets
def attempt(fn):
    try:
        fn(); res = 'succeeded'
    except OSError as e:
        res = [type(e).__name__, e.errno, e.strerror]
    return res
def nonblocking(*args):
    s = socket.socket(*args); s.setblocking(False)
    return s
"""


def test_only_loopback_interface_exists(module_session):
    out = inside(module_session, PRELUDE + """
print(json.dumps({'sys': sorted(os.listdir('/sys/class/net')), 'idx': socket.if_nameindex(),
                  'dev': sorted(l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]),
                  'routes': open('/proc/net/route').read().splitlines()[1:]}))
""")
    assert out["sys"] == ["lo"]
    assert out["idx"] == [[1, "lo"]]
    assert out["dev"] == ["lo"]
    assert out["routes"] == []  # no IPv4 route at all, not even a default one
    assert_healthy(module_session)


def test_tcp_connect_out_fails_at_once(module_session):
    out = inside(module_session, PRELUDE + """
print(json.dumps({'res': attempt(lambda: nonblocking().connect(('192.0.2.1', 443))),
                  'lo': attempt(lambda: nonblocking().connect(('127.0.0.1', 9)))}))
""")
    assert out["res"] == ["OSError", 101, "Network is unreachable"]  # refused in the syscall: nothing to wait for
    assert out["lo"][:2] in (["BlockingIOError", 115], ["ConnectionRefusedError", 111]), out["lo"]  # a routed one
    assert_healthy(module_session)


def test_udp_sendto_out_fails_at_once(module_session):
    out = inside(module_session, PRELUDE + """
before = lo_tx()
res = attempt(lambda: nonblocking(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'payload', ('192.0.2.1', 53)))
print(json.dumps({'res': res, 'lo_sent': lo_tx() - before}))
""")
    assert out["res"] == ["OSError", 101, "Network is unreachable"]
    assert out["lo_sent"] == 0
    assert_healthy(module_session)


def test_dns_lookup_fails_without_resolver_traffic(module_session):
    out = inside(module_session, PRELUDE + """
before = lo_tx()
try:
    socket.getaddrinfo('example.com', 443); res = 'resolved'
except socket.gaierror as e:
    res = [type(e).__name__, e.errno, e.strerror]
servers = [l.split()[1] for l in open('/etc/resolv.conf') if l.split()[:1] == ['nameserver']]
sends = {ns: attempt(lambda ns=ns: nonblocking(socket.AF_INET6 if ':' in ns else socket.AF_INET, socket.SOCK_DGRAM)
                     .sendto(b'query', (ns, 53))) for ns in servers}
print(json.dumps({'res': res, 'lo_sent': lo_tx() - before, 'sends': sends,
                  'ifaces': sorted(l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:])}))
""")
    # EAI_AGAIN: the resolver could not send its query anywhere (no route); EAI_NONAME would do as well
    assert out["res"][0] == "gaierror"
    assert out["res"][1] in (socket.EAI_AGAIN, socket.EAI_NONAME), out["res"]
    # so it fails at once, with no resolver timeout to wait out: a query to each configured
    # nameserver is refused in the syscall (with no nameserver at all, glibc would ask 127.0.0.1
    # over lo, which lo_sent == 0 rules out)
    unreachable = (["OSError", 101, "Network is unreachable"], ["OSError", 99, "Cannot assign requested address"])
    assert all(r in unreachable for r in out["sends"].values()), out["sends"]
    # the only interface is lo, and not one packet went through it: no query was sent
    assert out["ifaces"] == ["lo"] and out["lo_sent"] == 0
    assert_healthy(module_session)


def test_raw_and_packet_sockets_are_refused(module_session):
    out = inside(module_session, PRELUDE + """
print(json.dumps({
    'raw_icmp': attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)),
    'raw_tcp': attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)),
    'raw6': attempt(lambda: socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)),
    'packet': attempt(lambda: socket.socket(17, socket.SOCK_RAW, 0x0300)),  # AF_PACKET, ETH_P_ALL
    'packet_dgram': attempt(lambda: socket.socket(17, socket.SOCK_DGRAM, 0x0300)),
}))
""")
    eperm = ["PermissionError", 1, "Operation not permitted"]
    assert out == {"raw_icmp": eperm, "raw_tcp": eperm, "raw6": eperm, "packet": eperm, "packet_dgram": eperm}
    assert_healthy(module_session)


def test_icmp_ping_socket_cannot_send_out(module_session):
    out = inside(module_session, PRELUDE + """
try:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP); made = 'made'
except OSError as e:
    s, made = None, [type(e).__name__, e.errno]
res = attempt(lambda: s.sendto(b'\\x08\\0\\0\\0\\0\\0\\0\\0', ('192.0.2.1', 0))) if s else None
print(json.dumps({'made': made, 'send': res}))
""")
    # unprivileged ICMP sockets exist where ping_group_range allows them: they still have no route
    if out["made"] == "made":
        assert out["send"] == ["OSError", 101, "Network is unreachable"]
    else:
        assert out["made"] in (["PermissionError", 13], ["PermissionError", 1])
    assert_healthy(module_session)


def test_ipv6_connect_out_fails_at_once(module_session):
    out = inside(module_session, PRELUDE + """
print(json.dumps(attempt(lambda: nonblocking(socket.AF_INET6).connect(('2001:db8::1', 443)))))
""")
    # ENETUNREACH with IPv6 on lo, EADDRNOTAVAIL where Docker disabled IPv6 in the namespace: no route either
    # way, refused in the syscall of a non-blocking socket (a routed address would give EINPROGRESS)
    assert out in (["OSError", 101, "Network is unreachable"], ["OSError", 99, "Cannot assign requested address"])
    assert_healthy(module_session)


def test_host_loopback_services_are_not_reachable(module_session):
    """A server on the host's 127.0.0.1 is invisible: the sandbox's loopback is its own."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    accepted: list[object] = []
    srv.settimeout(0.2)

    def serve() -> None:
        try:
            accepted.append(srv.accept())
        except OSError:
            pass

    t = threading.Thread(target=serve)
    t.start()
    try:
        out = inside(module_session, PRELUDE + f"""
def go():
    s = socket.socket(); s.settimeout(5); s.connect(('127.0.0.1', {port}))
print(json.dumps(attempt(go)))
""")
    finally:
        t.join()
        srv.close()
    assert out == ["ConnectionRefusedError", 111, "Connection refused"]
    assert accepted == []
    assert_healthy(module_session)


def test_loopback_inside_the_sandbox_works_and_stays_inside(module_session):
    out = inside(module_session, PRELUDE + """
import threading
srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen(1)
port = srv.getsockname()[1]
def serve():
    c, _ = srv.accept(); c.sendall(c.recv(100).upper()); c.close()
t = threading.Thread(target=serve); t.start()
c = socket.create_connection(('127.0.0.1', port), timeout=5); c.sendall(b'ping'); got = c.recv(100); c.close()
t.join(); srv.close()
print(json.dumps({'got': got.decode(), 'v6': attempt(lambda: socket.create_connection(('::1', port), timeout=2))}))
""")
    assert out["got"] == "PING"
    # ::1 is refused (or absent where IPv6 is off): nothing listens there
    assert out["v6"][1] in (111, 99, 97), out["v6"]
    assert_healthy(module_session)


def test_host_unix_sockets_are_unreachable(module_session):
    """docker.sock is absent, and an abstract socket bound on the host is in another namespace."""
    name = f"kx-security-{secrets.token_hex(6)}"
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.bind("\0" + name)
    host.listen(1)
    host.setblocking(False)
    try:
        out = inside(module_session, PRELUDE + f"""
def unix(path):
    def go():
        s = socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect(path)
    return attempt(go)
# a unix socket of the sandbox's own, in /tmp, works
own = socket.socket(socket.AF_UNIX); own.bind('/tmp/own.sock'); own.listen(1)
c = socket.socket(socket.AF_UNIX); c.connect('/tmp/own.sock'); peer, _ = own.accept()
c.sendall(b'hi'); inner = peer.recv(10).decode(); c.close(); peer.close(); own.close(); os.unlink('/tmp/own.sock')
print(json.dumps({{'docker': unix('/var/run/docker.sock'), 'docker2': unix('/run/docker.sock'),
                  'containerd': unix('/run/containerd/containerd.sock'), 'abstract': unix('\\0{name}'),
                  'inner': inner}}))
""")
        with pytest.raises(BlockingIOError):
            host.accept()  # nobody came through
    finally:
        host.close()
    enoent = ["FileNotFoundError", 2, "No such file or directory"]
    assert out["docker"] == enoent and out["docker2"] == enoent and out["containerd"] == enoent
    assert out["abstract"] == ["ConnectionRefusedError", 111, "Connection refused"]
    assert out["inner"] == "hi"
    assert_healthy(module_session)


def test_netlink_cannot_change_the_network(module_session):
    """AF_NETLINK is allowed (getaddrinfo uses it), but adding an address needs CAP_NET_ADMIN."""
    out = inside(module_session, PRELUDE + """
import struct
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)  # NETLINK_ROUTE
s.bind((0, 0))
# RTM_NEWADDR 10.99.0.1/24 on lo (ifindex 1), NLM_F_REQUEST|NLM_F_ACK|NLM_F_CREATE|NLM_F_EXCL
ifa = struct.pack('BBBBI', socket.AF_INET, 24, 0, 0, 1)
rta = struct.pack('HH', 8, 2) + socket.inet_aton('10.99.0.1')  # IFA_LOCAL
body = ifa + rta
msg = struct.pack('IHHII', 16 + len(body), 20, 0x1 | 0x4 | 0x400 | 0x200, 1, 0) + body
s.send(msg)
reply = s.recv(4096)
length, kind, flags, seq, pid, error = struct.unpack('IHHIIi', reply[:20])
s.close()
print(json.dumps({'kind': kind, 'error': error}))
""")
    assert out == {"kind": 2, "error": -1}  # NLMSG_ERROR carrying -EPERM
    assert_healthy(module_session)
