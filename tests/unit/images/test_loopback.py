"""registry.is_loopback decides where plain HTTP is asked first and allowed: it must agree
with the ipaddress module (which it no longer imports, for start-up time) on every address."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supermachine.images.registry import is_loopback


@given(st.ip_addresses())
def test_addresses_agree_with_ipaddress(address):
    assert is_loopback(str(address)) == address.is_loopback
    if address.version == 6:
        assert is_loopback(f"[{address}]") == address.is_loopback


@pytest.mark.parametrize(("host", "loopback"), [
    ("localhost", True), ("LOCALHOST", True), ("registry.localhost", True),
    ("127.0.0.1", True), ("127.255.0.9", True), ("::1", True), ("[::1]", True),
    ("0:0:0:0:0:0:0:1", True),
    ("10.0.0.1", False), ("128.0.0.1", False), ("::2", False), ("example.com", False),
    ("localhost.example.com", False), ("127.1", False), ("", False), ("127.0.0.1x", False),
    ("::ffff:127.0.0.1", ipaddress.ip_address("::ffff:127.0.0.1").is_loopback),
])
def test_names_and_spellings(host, loopback):
    assert is_loopback(host) == loopback
