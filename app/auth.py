"""Bearer API keys: compared as sha256 digests in constant time; the owner id is a hash of the key.

Wrong keys are rate-limited per client address (AuthLimiter): after `auth_fail_limit` failures in
`auth_fail_window_s` seconds every request from that address is a 429 until the window ends, so
keys cannot be guessed at line rate. Counted in Redis, so all API processes share the count."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import sys

import redis
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.errors import ApiError
from core.settings import Settings
from core.store import Keys, owner_of

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


class AuthLimiter:
    """Fixed-window count of wrong keys per client address, in Redis (P:authfail:<address>)."""

    def __init__(self, r: redis.Redis, keys: Keys, settings: Settings) -> None:
        self.r, self.prefix = r, f"{keys.prefix}:authfail:"
        self.limit, self.window_s = settings.auth_fail_limit, settings.auth_fail_window_s

    def check(self, client: str) -> None:
        """429 while this client has used up its failures (checked before the key: a right
        guess during the lockout must not be told apart from a wrong one)."""
        failures = self.r.get(self.prefix + client)
        if failures is not None and int(failures) >= self.limit:
            retry = max(1, self.r.ttl(self.prefix + client))
            raise ApiError(
                429,
                "too_many_auth_failures",
                f"too many invalid API keys from this address; retry in {retry} s",
                headers={"Retry-After": str(retry)},
            )

    def failed(self, client: str) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.set(self.prefix + client, 0, ex=self.window_s, nx=True)  # the window starts at the first failure
        pipe.incr(self.prefix + client)
        pipe.execute()


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
    limiter: AuthLimiter = request.app.state.auth_limiter
    client = request.client.host if request.client else "unknown"
    limiter.check(client)
    try:
        return ring.owner(request.headers.get("authorization"))
    except ApiError as e:
        if e.code == "invalid_api_key":  # a wrong guess; a missing header is not counted
            limiter.failed(client)
        raise
