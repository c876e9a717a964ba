"""Webhook secrets, Standard Webhooks signatures and the SSRF guard on webhook URLs.

Signature scheme (Standard Webhooks 1.0, https://www.standardwebhooks.com): the secret is
`whsec_` + base64 of 32 random bytes; the key is the decoded bytes; a delivery carries
`webhook-id`, `webhook-timestamp` (integer Unix seconds) and
`webhook-signature: v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`.

SSRF: a URL is checked on the addresses its host resolves to *now* (at registration and again
before every attempt, since DNS can change); the sender then connects to the address it checked,
not to a second lookup, so a rebinding DNS answer cannot slip a private address in between.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import secrets
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx

from spkd.common.spec import text_problem

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32  # the spec asks for 24 to 64
MAX_URL_LENGTH = 2000

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NOT_ALLOWED = (
    "{what}: private, loopback, link-local, multicast and reserved addresses cannot receive "
    "webhooks (the admin setting SPKD_WEBHOOKS_ALLOW_PRIVATE allows them)"
)


class UrlRefused(Exception):
    """A webhook URL that may not be called: `code` is the stable API error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def new_secret() -> str:
    """A fresh signing secret, `whsec_` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value for one attempt: `v1,` + base64 HMAC-SHA256 over
    `{msg_id}.{timestamp}.{body}` with the decoded secret as key."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


# ---------------------------------------------------------------- SSRF

_net = ipaddress.ip_network
# IPv6 forms whose only meaning is the IPv4 address in their low 32 bits: judged by that address
# alone (::ffff:8.8.8.8 is 8.8.8.8; 64:ff9b::127.0.0.1 reaches 127.0.0.1 through a NAT64 gateway).
_V4_WRAPPERS = (
    _net("::ffff:0:0/96"),  # IPv4-mapped (RFC 4291)
    _net("::/96"),  # IPv4-compatible (deprecated; also holds :: and ::1, as 0.0.0.0 and 0.0.0.1)
    _net("::ffff:0:0:0/96"),  # IPv4-translated (SIIT, RFC 2765)
    _net("64:ff9b::/96"),  # NAT64 well-known prefix (RFC 6052)
)
NAT64_LOCAL = _net("64:ff9b:1::/48")  # NAT64 local-use (RFC 8215): the operator picks the prefix length
# Not globally reachable by the IANA special-purpose registries, beyond what Python 3.11's
# is_global knows (its list predates these).
_NOT_GLOBAL = (
    NAT64_LOCAL,
    _net("fec0::/10"),  # site-local (deprecated, still routed inside some sites)
    _net("3fff::/20"),  # documentation (RFC 9637)
    _net("5f00::/16"),  # SRv6 SIDs (RFC 9602)
    _net("192.0.0.0/24"),  # IETF protocol assignments (Python knows only parts of it)
    _net("192.88.99.0/24"),  # 6to4 relay anycast (deprecated, RFC 7526)
)


def _rfc6052(packed: bytes, prefix_len: int) -> ipaddress.IPv4Address:
    """The IPv4 address an RFC 6052 IPv4-embedded IPv6 address carries after a `prefix_len`-bit
    prefix (32, 40, 48, 56, 64 or 96); bits 64-71 (byte 8) are never part of it."""
    at = [i for i in range(prefix_len // 8, 16) if i != 8][:4]
    return ipaddress.IPv4Address(bytes(packed[i] for i in at))


def embedded_ipv4(ip: IPAddress) -> list[ipaddress.IPv4Address]:
    """Every IPv4 address an IPv6 address embeds (empty for an IPv4 address or a plain IPv6 one):
    IPv4-mapped, IPv4-compatible, IPv4-translated, NAT64 (64:ff9b::/96, and each RFC 6052
    position inside the local-use 64:ff9b:1::/48), 6to4 (2002::/16), Teredo (2001::/32: the
    server and the de-obfuscated client) and ISATAP (an interface id [0-3]00:5efe:a.b.c.d under
    any prefix)."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    out: list[ipaddress.IPv4Address] = []
    low = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if any(ip in net for net in _V4_WRAPPERS):
        out.append(low)
    if ip in NAT64_LOCAL:
        out += [_rfc6052(ip.packed, n) for n in (48, 56, 64, 96)]
    if ip.sixtofour is not None:
        out.append(ip.sixtofour)
    if ip.teredo is not None:
        out += list(ip.teredo)
    if (int(ip) >> 32) & 0xFCFFFFFF == 0x00005EFE:  # ISATAP (RFC 5214), u/g bits either way
        out.append(low)
    return list(dict.fromkeys(out))


def _reachable(ip: IPAddress) -> bool:
    return ip.is_global and not ip.is_multicast and not any(ip in net for net in _NOT_GLOBAL)


def is_public(ip: IPAddress) -> bool:
    """True for a globally routable unicast address; False for private, loopback, link-local
    (169.254.0.0/16: cloud metadata), shared (100.64.0.0/10), reserved, unspecified, documentation
    and multicast addresses. An IPv6 address that embeds IPv4 addresses (embedded_ipv4) is public
    only when each of them is; a pure wrapper (::ffff:a.b.c.d, ::a.b.c.d, ::ffff:0:a.b.c.d,
    64:ff9b::a.b.c.d) is judged by its IPv4 address alone."""
    inner = embedded_ipv4(ip)
    if any(ip in net for net in _V4_WRAPPERS):
        return all(map(_reachable, inner))
    return _reachable(ip) and all(map(_reachable, inner))


def describe(ip: IPAddress) -> str:
    """The address as a message shows it, with the IPv4 addresses it embeds: `64:ff9b::7f00:1
    (IPv4 127.0.0.1)`."""
    inner = embedded_ipv4(ip)
    return f"{ip} (IPv4 {', '.join(map(str, inner))})" if inner else str(ip)


@dataclass(frozen=True)
class Target:
    """A checked webhook URL: where to connect (`address`) and what to say in Host/SNI."""

    url: httpx.URL
    host: str
    address: str

    def pinned_url(self) -> httpx.URL:
        """The URL with the checked address in place of the host name (the Host header and the
        TLS server name keep the name)."""
        return self.url.copy_with(host=self.address)

    def host_header(self) -> str:
        default = {"http": 80, "https": 443}[self.url.scheme]
        port = self.url.port or default
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if port == default else f"{host}:{port}"


def parse_url(raw: str) -> httpx.URL:
    """Parse and check the form of a webhook URL: http or https, a host, no more than 2000 chars.
    Raises UrlRefused('invalid_webhook_url')."""
    if len(raw) > MAX_URL_LENGTH:
        raise UrlRefused("invalid_webhook_url", f"the URL is longer than {MAX_URL_LENGTH} characters")
    problem = text_problem(raw)  # stored and listed as sent: no controls, no bidi overrides
    if problem:
        raise UrlRefused("invalid_webhook_url", f"the URL {problem}")
    try:
        url = httpx.URL(raw)
    except (httpx.InvalidURL, ValueError) as e:
        raise UrlRefused("invalid_webhook_url", f"not a valid URL: {_clip(str(e))}") from None
    if url.scheme not in ("http", "https"):
        raise UrlRefused("invalid_webhook_url", "only http:// and https:// URLs can receive webhooks")
    if not url.host:
        raise UrlRefused("invalid_webhook_url", "the URL has no host")
    return url


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to (an IP literal: itself). Raises
    UrlRefused('webhook_url_unresolvable')."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as e:
        what = f"the host {_clip(host)!r} does not resolve: {e}"
        raise UrlRefused("webhook_url_unresolvable", what) from None
    out: list[IPAddress] = []
    for info in infos:
        addr = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])  # drop an IPv6 zone id
        if addr not in out:
            out.append(addr)
    if not out:
        raise UrlRefused("webhook_url_unresolvable", f"the host {_clip(host)!r} has no address")
    return out


def check_url(raw: str, allow_private: bool) -> Target:
    """Parse, resolve and check a webhook URL. Every resolved address must be public unless
    `allow_private` (SPKD_WEBHOOKS_ALLOW_PRIVATE): one private answer among public ones is refused
    too, since the HTTP client could pick it. Raises UrlRefused with codes invalid_webhook_url,
    webhook_url_unresolvable or webhook_url_not_allowed."""
    url = parse_url(raw)
    port = url.port or {"http": 80, "https": 443}[url.scheme]
    name = url.host.rstrip(".").lower()  # "localhost." is localhost: the root label changes nothing
    if not allow_private and (name == "localhost" or name.endswith(".localhost")):
        what = f"{_clip(url.host)!r} is loopback"
        raise UrlRefused("webhook_url_not_allowed", _NOT_ALLOWED.format(what=what))
    addresses = resolve(name, port)
    if not allow_private:
        _refuse_private(url.host, addresses)
    return Target(url=url, host=url.host, address=str(addresses[0]))


def _refuse_private(host: str, addresses: list[IPAddress]) -> None:
    bad = [describe(a) for a in addresses if not is_public(a)]
    if bad:
        what = f"{_clip(host)!r} resolves to {', '.join(bad)}"
        raise UrlRefused("webhook_url_not_allowed", _NOT_ALLOWED.format(what=what))


def _clip(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


# ---------------------------------------------------------------- the connection itself


class GuardedBackend(httpcore.SyncBackend):
    """httpcore's socket layer with the SSRF guard at the one place every request goes through:
    the host httpx is about to connect to is resolved here, every answer checked (is_public), the
    socket opened to the address checked, and the peer it reached checked again before a byte is
    sent. So nothing reaches a private address whatever URL the client is handed (a pinned
    address, a redirect someone turned on, a name that rebinds between check_url and the
    connection). Raises UrlRefused (webhook_url_not_allowed, webhook_url_unresolvable)."""

    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        if self.allow_private:
            return super().connect_tcp(host, port, timeout, local_address, socket_options)
        addresses = resolve(host, port)
        _refuse_private(host, addresses)
        stream = super().connect_tcp(str(addresses[0]), port, timeout, local_address, socket_options)
        sock = stream.get_extra_info("socket")
        peer = ipaddress.ip_address(str(sock.getpeername()[0]).split("%", 1)[0])
        if not is_public(peer):
            stream.close()
            _refuse_private(host, [peer])
        return stream


class GuardedTransport(httpx.HTTPTransport):
    """httpx's own transport on a GuardedBackend (webhook deliveries use nothing else)."""

    def __init__(self, allow_private: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # HTTPTransport takes no network backend; its pool is the one object that opens sockets.
        self._pool._network_backend = GuardedBackend(allow_private)  # type: ignore[union-attr]
