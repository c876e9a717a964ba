"""Bearer API keys: compared as sha256 digests in constant time; the owner id is a hash of the key."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

from fastapi import Request

from app.errors import ApiError
from app.settings import Settings
from app.store import owner_of

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


def check_can_serve(settings: Settings, host: str) -> None:
    """No key configured: refuse, unless SPKD_ALLOW_OPEN=true and the server binds to loopback."""
    if settings.api_key_list():
        return
    if settings.allow_open and is_loopback(host):
        return
    if settings.allow_open:
        raise SystemExit(f"refusing to serve without API keys on {host}: open mode is for loopback only")
    raise SystemExit(
        "refusing to serve without API keys: set SPKD_API_KEYS=key1,key2 "
        "(or SPKD_ALLOW_OPEN=true with --host 127.0.0.1 for a local, single-user server)"
    )


def request_owner(request: Request) -> str:
    """FastAPI dependency: the owner id of the caller."""
    ring: KeyRing = request.app.state.keyring
    return ring.owner(request.headers.get("authorization"))
