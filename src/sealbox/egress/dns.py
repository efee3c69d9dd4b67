"""The per-sandbox DNS stub: allowlisted names get a synthetic address, the rest NXDOMAIN.

Nothing is forwarded: the sandbox learns no real address. The synthetic address a name got is
how the proxy later knows which name the sandbox meant, without trusting anything the sandbox
sends. `answer` is sans-I/O; `DnsServer` binds it to UDP.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections import OrderedDict
from collections.abc import Callable
from typing import cast

from dnslib import QTYPE, RCODE, RR, A, DNSError, DNSRecord

from sealbox.egress.audit import AuditLog
from sealbox.egress.policy import Policy, normalize_name
from sealbox.errors import ConfigError

SYNTHETIC_NET = ipaddress.IPv4Network("198.18.0.0/15")
TTL = 30


class NameMap:
    """Name <-> synthetic address for one sandbox. When the range is used up the least
    recently used name gives its address away (a sandbox can only confuse itself)."""

    def __init__(self, network: ipaddress.IPv4Network = SYNTHETIC_NET) -> None:
        self.network = network
        self._by_name: OrderedDict[str, ipaddress.IPv4Address] = OrderedDict()
        self._by_addr: dict[ipaddress.IPv4Address, str] = {}
        self._next = 1  # skip the network address

    def address_for(self, name: str) -> ipaddress.IPv4Address:
        addr = self._by_name.get(name)
        if addr is not None:
            self._by_name.move_to_end(name)
            return addr
        if self._next < self.network.num_addresses - 1:
            addr = self.network[self._next]
            self._next += 1
        else:
            _, addr = self._by_name.popitem(last=False)
            del self._by_addr[addr]
        self._by_name[name] = addr
        self._by_addr[addr] = name
        return addr

    def name_for(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
        return self._by_addr.get(addr) if isinstance(addr, ipaddress.IPv4Address) else None


def answer(query: bytes, policy: Policy, names: NameMap, audit: AuditLog) -> bytes | None:
    """The reply to one DNS message, or None to drop it (not a parseable query)."""
    try:
        request = DNSRecord.parse(query)
    except (DNSError, ValueError, IndexError):
        return None
    if request.header.qr:  # a response, not a query
        return None
    reply = request.reply()
    if request.header.opcode != 0 or len(request.questions) != 1:
        reply.header.rcode = RCODE.NOTIMP if request.header.opcode != 0 else RCODE.FORMERR
        return bytes(reply.pack())
    question = request.questions[0]
    qtype = QTYPE.get(question.qtype, str(question.qtype))
    try:
        name = normalize_name(str(question.qname))
        decision = policy.check_name(name, None)
    except ConfigError:
        name, decision = str(question.qname), None
    if decision is None or not decision.allowed:
        audit.record("dns_blocked", host=name, qtype=qtype,
                     reason=decision.reason if decision else "invalid name")
        reply.header.rcode = RCODE.NXDOMAIN
        return bytes(reply.pack())
    audit.record("dns_query", host=name, qtype=qtype)
    if question.qtype == QTYPE.A:
        reply.add_answer(RR(question.qname, QTYPE.A, rdata=A(str(names.address_for(name))),
                            ttl=TTL))
    # AAAA and every other type: an empty NOERROR, so clients fall back to A.
    return bytes(reply.pack())


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, handle: Callable[[bytes], bytes | None]) -> None:
        self._handle = handle
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        reply = self._handle(data)
        if reply is not None and self._transport is not None:
            self._transport.sendto(reply, addr)


class DnsServer:
    """The stub on (HOST, PORT) over UDP. TCP queries reach the proxy (every TCP connection
    from a sandbox is redirected there), which answers them with `answer` too."""

    def __init__(self, handle: Callable[[bytes], bytes | None]) -> None:
        self._handle = handle
        self._transport: asyncio.DatagramTransport | None = None

    async def start(self, host: str, port: int) -> None:
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _UdpProtocol(self._handle), local_addr=(host, port))
        self._transport = transport

    @property
    def address(self) -> tuple[str, int]:
        assert self._transport is not None
        host, port = self._transport.get_extra_info("sockname")[:2]
        return str(host), int(port)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
