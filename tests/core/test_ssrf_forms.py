"""Every IPv6 form that carries an IPv4 address is judged as that IPv4 address by the webhook SSRF
guard (core/webhook_security.py), and none of them gets past the MLflow allowlist
(core.references.tracking_uri_allowed). Pure address logic: no network."""

from __future__ import annotations

import ipaddress

import pytest

from spkd.core import references, webhook_security
from spkd.core.settings import Settings

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address


def _hex32(v4: str) -> tuple[str, str]:
    n = int(V4(v4))
    return f"{n >> 16:x}", f"{n & 0xFFFF:x}"


def _rfc6052(prefix: str, prefix_len: int, v4: str) -> V6:
    """An RFC 6052 address: the IPv4 bits after a `prefix_len`-bit prefix, skipping bits 64-71."""
    packed = bytearray(V6(prefix).packed)
    at = [i for i in range(prefix_len // 8, 16) if i != 8][:4]
    for i, b in zip(at, V4(v4).packed, strict=True):
        packed[i] = b
    return V6(bytes(packed))


def embeddings(v4: str) -> dict[str, V6]:
    """The IPv6 forms of one IPv4 address, by name."""
    hi, lo = _hex32(v4)
    n = int(V4(v4))
    teredo_client = n ^ 0xFFFFFFFF  # Teredo stores the client address obfuscated (bits flipped)
    forms = {
        "ipv4-mapped ::ffff:0:0/96": V6(f"::ffff:{v4}"),
        "ipv4-compatible ::/96": V6(f"::{v4}"),
        "ipv4-translated ::ffff:0:0:0/96": V6(f"::ffff:0:{v4}"),
        "nat64 64:ff9b::/96": V6(f"64:ff9b::{v4}"),
        "6to4 2002::/16": V6(f"2002:{hi}:{lo}::1"),
        "teredo server": V6(f"2001:0:{hi}:{lo}::1"),
        "teredo client": V6(f"2001:0:4136:e378:8000:63bf:{teredo_client >> 16:x}:{teredo_client & 0xFFFF:x}"),
        "isatap local 0000:5efe": V6(f"fe80::5efe:{hi}:{lo}"),
        "isatap global 0200:5efe under a public prefix": V6(f"2600:1f18::200:5efe:{hi}:{lo}"),
        "isatap 0000:5efe under a public prefix": V6(f"2600:1f18::5efe:{hi}:{lo}"),
    }
    for length in (48, 56, 64, 96):
        forms[f"nat64 local-use 64:ff9b:1::/{length}"] = _rfc6052("64:ff9b:1::", length, v4)
    return forms


PRIVATE_V4 = ["127.0.0.1", "169.254.169.254", "10.0.0.5", "192.168.1.1", "100.64.0.1", "0.0.0.0"]


@pytest.mark.parametrize("v4", PRIVATE_V4)
def test_every_form_embedding_a_private_ipv4_is_refused(v4: str) -> None:
    let_through = {}
    for form, ip in embeddings(v4).items():
        assert V4(v4) in webhook_security.embedded_ipv4(ip), (form, ip)
        if webhook_security.is_public(ip):
            let_through[form] = str(ip)
    assert let_through == {}


def test_pure_wrappers_of_a_public_ipv4_stay_usable() -> None:
    """::ffff:8.8.8.8 or 64:ff9b::8.8.8.8 is 8.8.8.8 (a NAT64 gateway reaches it): accepted."""
    forms = embeddings("8.8.8.8")
    for name in ("ipv4-mapped ::ffff:0:0/96", "ipv4-translated ::ffff:0:0:0/96", "nat64 64:ff9b::/96"):
        assert webhook_security.is_public(forms[name]), name
    assert webhook_security.is_public(forms["6to4 2002::/16"])
    # the local-use NAT64 prefix is never globally reachable, whatever it carries
    assert not webhook_security.is_public(forms["nat64 local-use 64:ff9b:1::/96"])


@pytest.mark.parametrize(
    "ip",
    ["fec0::1", "3fff::1", "5f00::1", "64:ff9b:1::1", "192.0.0.8", "::", "::1", "ff0e::1", "2001:db8::1"],
)
def test_special_purpose_ranges_python_may_call_global_are_refused(ip: str) -> None:
    assert not webhook_security.is_public(ipaddress.ip_address(ip))


@pytest.mark.parametrize("ip", ["93.184.215.14", "2606:4700:4700::1111", "2a00:1450:4001:80b::200e"])
def test_plain_public_addresses_are_public(ip: str) -> None:
    assert webhook_security.is_public(ipaddress.ip_address(ip))


@pytest.mark.parametrize(
    "url",
    [
        "http://[64:ff9b::7f00:1]/",  # NAT64 of 127.0.0.1
        "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/",  # NAT64 of 169.254.169.254
        "http://[::ffff:0:127.0.0.1]/",  # IPv4-translated
        "http://[::127.0.0.1]/",  # IPv4-compatible
        "http://[::a9fe:a9fe]/",
        "http://[64:ff9b:1::7f00:1]/",
        "http://[2001:0:7f00:1::1]/",  # Teredo server 127.0.0.1
        "http://[2600:1f18::200:5efe:a9fe:a9fe]/",  # ISATAP 169.254.169.254
        "http://[fe80::5efe:7f00:1]/",
    ],
)
def test_check_url_refuses_embedded_private_ipv4_and_names_it(url: str) -> None:
    with pytest.raises(webhook_security.UrlRefused) as e:
        webhook_security.check_url(url, allow_private=False)
    assert e.value.code == "webhook_url_not_allowed"
    assert "(IPv4 " in e.value.message, e.value.message


def test_check_url_still_resolves_embedded_forms_when_private_targets_are_allowed() -> None:
    target = webhook_security.check_url("http://[64:ff9b::7f00:1]:8080/h", allow_private=True)
    assert target.address == "64:ff9b::7f00:1"


# ---------------------------------------------------------------- the MLflow allowlist


@pytest.mark.parametrize(
    "uri",
    [
        "http://[::ffff:10.0.0.7]:5000",
        "http://[::ffff:a00:7]:5000",
        "http://[64:ff9b::10.0.0.7]:5000",
        "http://[::ffff:0:10.0.0.7]:5000",
        "http://[::10.0.0.7]:5000",
        "http://[2002:a00:7::1]:5000",
        "http://[64:ff9b::a9fe:a9fe]:5000",
        "http://[::ffff:169.254.169.254]/",
        "http://167772167:5000",  # 10.0.0.7 as one number
        "http://0xa.0.0.7:5000",
        "http://10.0.0.7.:5000",
        "http://10.0.0.7:5000@169.254.169.254/",
        "http://10.0.0.7:5000\\@169.254.169.254/",
    ],
)
def test_mlflow_allowlist_is_not_bypassed_by_other_spellings(tmp_path, uri: str) -> None:
    """The allowlist matches the operator's spelling exactly: another spelling of an allowed
    address, or a wrapped private one, is not on it (the worker would send its MLflow credentials
    there)."""
    settings = Settings(
        data_root=tmp_path, mlflow_allowed_uris="http://10.0.0.7:5000,https://mlflow.example.com"
    )
    assert references.tracking_uri_allowed(settings, "http://10.0.0.7:5000/x")  # the allowed one
    assert not references.tracking_uri_allowed(settings, uri)
