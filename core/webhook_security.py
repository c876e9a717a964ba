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
from dataclasses import dataclass

import httpx

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


def _unwrap(ip: IPAddress) -> IPAddress:
    """The IPv4 address inside an IPv4-mapped, 6to4 or Teredo IPv6 address (Python 3.11's
    is_private/is_loopback do not look inside ::ffff:127.0.0.1)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip.teredo is not None:
            return ip.teredo[1]
    return ip


def is_public(ip: IPAddress) -> bool:
    """True for a globally routable unicast address; False for private, loopback, link-local
    (169.254.0.0/16: cloud metadata), shared (100.64.0.0/10), reserved, unspecified, documentation
    and multicast addresses, also when wrapped in an IPv6 address."""
    inner = _unwrap(ip)
    return all(a.is_global and not a.is_multicast for a in {ip, inner})


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
    try:
        url = httpx.URL(raw)
    except (httpx.InvalidURL, ValueError) as e:
        raise UrlRefused("invalid_webhook_url", f"not a valid URL: {e}") from None
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
        raise UrlRefused("webhook_url_unresolvable", f"the host {host!r} does not resolve: {e}") from None
    out: list[IPAddress] = []
    for info in infos:
        addr = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])  # drop an IPv6 zone id
        if addr not in out:
            out.append(addr)
    if not out:
        raise UrlRefused("webhook_url_unresolvable", f"the host {host!r} has no address")
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
        raise UrlRefused("webhook_url_not_allowed", _NOT_ALLOWED.format(what=f"{url.host!r} is loopback"))
    addresses = resolve(name, port)
    if not allow_private:
        bad = [str(a) for a in addresses if not is_public(a)]
        if bad:
            what = f"{url.host!r} resolves to {', '.join(bad)}"
            raise UrlRefused("webhook_url_not_allowed", _NOT_ALLOWED.format(what=what))
    return Target(url=url, host=url.host, address=str(addresses[0]))
