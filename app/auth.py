"""Bearer API keys: compared as sha256 digests in constant time; the owner id is a hash of the key.

Wrong keys are rate-limited per client (AuthLimiter): of the wrong keys one client sends in
`auth_fail_window_s` seconds (the window opens at its first), the first `auth_fail_limit` get 401
and the rest 429 until the window ends. Counted in Redis with one atomic INCR per wrong key, so
all API processes share the count and concurrent wrong keys cannot slip past it. Only wrong keys
are throttled: a request with a valid key is never refused by the limiter, so a client (or a
neighbour behind the same NAT) retrying a stale key does not lock out the keys that work. The
price: during a lockout a right guess still answers 200, so guessing is slowed, not stopped,
which is why keys must be long and random (MIN_KEY_LENGTH, checked at `spkd serve`)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import sys

import redis
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from spkd.app.errors import ApiError
from spkd.core.settings import Settings
from spkd.core.store import Keys, owner_of

OPEN_OWNER = "open"


class KeyRing:
    def __init__(self, settings: Settings) -> None:
        self.digests = [hashlib.sha256(k.encode()).digest() for k in settings.api_key_list()]
        self.open = not self.digests and settings.allow_open

    def owner(self, authorization: str | None) -> str:
        if self.open:
            return OPEN_OWNER
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                401,
                "unauthorized",
                "send 'Authorization: Bearer <api key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        digest = hashlib.sha256(token.strip().encode()).digest()
        # Compare with every key (no early exit) so timing says nothing about which matched.
        matched = False
        for d in self.digests:
            matched |= hmac.compare_digest(digest, d)
        if not matched:
            raise ApiError(
                401, "invalid_api_key", "the API key is not valid", headers={"WWW-Authenticate": "Bearer"}
            )
        return owner_of(token.strip())


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


MIN_KEY_LENGTH = 24  # below this a key is guessable at the wrong-key limiter's rate


def check_can_serve(settings: Settings, host: str) -> None:
    """No key configured: refuse, unless SPKD_ALLOW_OPEN=true and the server binds to loopback.
    Keys shorter than MIN_KEY_LENGTH are served with a warning on stderr (never the keys)."""
    keys = settings.api_key_list()
    if keys:
        short = sum(len(k) < MIN_KEY_LENGTH for k in keys)
        if short:
            print(
                f"warning: {short} of the {len(keys)} API keys in SPKD_API_KEYS are under "
                f"{MIN_KEY_LENGTH} characters, guessable; make them random: "
                'python3 -c "import secrets; print(secrets.token_urlsafe(32))"',
                file=sys.stderr,
            )
        return
    if settings.allow_open and is_loopback(host):
        return
    if settings.allow_open:
        raise SystemExit(f"refusing to serve without API keys on {host}: open mode is for loopback only")
    raise SystemExit(
        "refusing to serve without API keys: set SPKD_API_KEYS=key1,key2 "
        "(or SPKD_ALLOW_OPEN=true with --host 127.0.0.1 for a local, single-user server)"
    )


def client_key(host: str) -> str:
    """Whom the wrong-key limiter counts for a peer address: an IPv4 address as itself (also when
    it arrives IPv4-mapped, ::ffff:a.b.c.d, on a dual-stack socket), an IPv6 address by its /64
    (one host or one customer's LAN: a client rotating through its /64 is one client), anything
    else (a Unix socket, a test client) as given."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


# One wrong key: count it and open the window with the first one (a key left without a TTL is
# given one), in one step. Returns {count, seconds left in the window}.
_COUNT_FAILURE = """
local n = redis.call('INCR', KEYS[1])
if n == 1 or redis.call('TTL', KEYS[1]) < 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return {n, redis.call('TTL', KEYS[1])}
"""


class AuthLimiter:
    """Fixed-window count of wrong keys per client (client_key), in Redis (P:authfail:<client>)."""

    def __init__(self, r: redis.Redis, keys: Keys, settings: Settings) -> None:
        self.r, self.prefix = r, f"{keys.prefix}:authfail:"
        self.limit, self.window_s = settings.auth_fail_limit, settings.auth_fail_window_s
        self._count = r.register_script(_COUNT_FAILURE)

    def failed(self, client: str) -> None:
        """Count one wrong key from `client` (a peer address). Raises ApiError 429
        `too_many_auth_failures` (with Retry-After, seconds) when it is past the limit in this
        window; returns when the caller should answer its own 401."""
        n, ttl = self._count(keys=[self.prefix + client_key(client)], args=[self.window_s])
        if int(n) > self.limit:
            retry = max(1, int(ttl))
            raise ApiError(
                429,
                "too_many_auth_failures",
                f"too many invalid API keys from this address; retry in {retry} s",
                headers={"Retry-After": str(retry)},
            )


# Declares the scheme in the OpenAPI document, so /docs has an "Authorize" button that sends the
# key. auto_error=False: the header is checked below, with spkd's own error codes and rate limit.
bearer_scheme = HTTPBearer(auto_error=False, description="an API key from SPKD_API_KEYS")


def request_owner(
    request: Request, _credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme)
) -> str:
    """FastAPI dependency: the owner id of the caller.

    Raises ApiError 401 (`unauthorized`, `invalid_api_key`) or 429 (`too_many_auth_failures`)."""
    ring: KeyRing = request.app.state.keyring
    if ring.open:
        return OPEN_OWNER
    try:
        return ring.owner(request.headers.get("authorization"))
    except ApiError as e:
        if e.code == "invalid_api_key":  # a wrong guess (a missing header is not counted)
            limiter: AuthLimiter = request.app.state.auth_limiter
            limiter.failed(request.client.host if request.client else "unknown")
        raise
