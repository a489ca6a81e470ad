"""The address per-IP limits count: X-Forwarded-For only through trusted proxies, and then
only what they appended; an IPv6 client as its /64."""

from __future__ import annotations

import dataclasses
from ipaddress import ip_address, ip_network
from typing import Any
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from hypothesis import given
from hypothesis import strategies as st

from flashsale.errors import ConfigError
from flashsale.settings import Settings
from gateway.http import client_ip, forwarded_address
from gateway.state import SETTINGS


def ip_of(peer: str, forwarded: str | None, **settings: Any) -> str:
    app = web.Application()
    app[SETTINGS] = dataclasses.replace(Settings.from_env({}), **settings)
    transport = mock.Mock()
    transport.get_extra_info.return_value = (peer, 40000)
    headers = {} if forwarded is None else {"X-Forwarded-For": forwarded}
    return client_ip(make_mocked_request("POST", "/", headers=headers, app=app,
                                         transport=transport))  # fmt: skip


PROXIES = (ip_network("10.0.0.0/8"), ip_network("2001:db8:ffff::/48"))


@pytest.mark.parametrize(
    ("peer", "forwarded", "settings", "expected"),
    [
        # no proxy trusted: the header is the client's own writing
        ("192.0.2.1", "198.51.100.7", {}, "192.0.2.1"),
        # one proxy in front, trusted as the peer: the address it appended
        ("192.0.2.1", "203.0.113.9, 198.51.100.7", {"trust_forwarded": True}, "198.51.100.7"),
        ("192.0.2.1", None, {"trust_forwarded": True}, "192.0.2.1"),
        ("192.0.2.1", "garbage", {"trust_forwarded": True}, "192.0.2.1"),
        # listed proxies: the rightmost address that is not one of them
        ("10.0.0.5", "203.0.113.9, 198.51.100.7, 10.1.2.3", {"trusted_proxies": PROXIES},
         "198.51.100.7"),
        # a peer that is not a listed proxy: the header counts for nothing
        ("192.0.2.1", "198.51.100.7", {"trusted_proxies": PROXIES}, "192.0.2.1"),
        # every hop a proxy: the peer
        ("10.0.0.5", "10.1.1.1, 10.2.2.2", {"trusted_proxies": PROXIES}, "10.0.0.5"),
        # IPv6 clients per /64, through a proxy or not
        ("2001:db8:1:2:aaaa::1", None, {}, "2001:db8:1:2::/64"),
        ("2001:db8:ffff::1", "2001:db8:1:2:bbbb::9", {"trusted_proxies": PROXIES},
         "2001:db8:1:2::/64"),
        # a proxy that appends the client's port (Azure's Application Gateway does): the
        # address, not the proxy's own for every buyer behind it
        ("192.0.2.1", "198.51.100.7:51234", {"trust_forwarded": True}, "198.51.100.7"),
        ("192.0.2.1", "[2001:db8:1:2:aaaa::1]:443", {"trust_forwarded": True},
         "2001:db8:1:2::/64"),
        ("192.0.2.1", "[2001:db8:1:2:aaaa::1]", {"trust_forwarded": True}, "2001:db8:1:2::/64"),
        ("10.0.0.5", "198.51.100.7:1, 10.1.2.3:2", {"trusted_proxies": PROXIES},
         "198.51.100.7"),
        # what is not an address and a port still counts for nothing
        ("192.0.2.1", "198.51.100.7:port", {"trust_forwarded": True}, "192.0.2.1"),
        ("192.0.2.1", "198.51.100.7:99999", {"trust_forwarded": True}, "192.0.2.1"),
        ("192.0.2.1", "[198.51.100.7]:80", {"trust_forwarded": True}, "192.0.2.1"),
    ],
)  # fmt: skip
def test_the_address_that_counts(
    peer: str, forwarded: str | None, settings: dict[str, Any], expected: str
) -> None:
    assert ip_of(peer, forwarded, **settings) == expected


def test_a_bad_proxy_list_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="FLASHSALE_TRUSTED_PROXIES"):
        Settings.from_env({"FLASHSALE_TRUSTED_PROXIES": "10.0.0.0/8, not-a-network"})
    parsed = Settings.from_env({"FLASHSALE_TRUSTED_PROXIES": "10.0.0.0/8, 2001:db8::1"})
    assert parsed.trusted_proxies == (ip_network("10.0.0.0/8"), ip_network("2001:db8::1/128"))


ADDRESSES = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(lambda a: f"[{a}]"))


@given(address=ADDRESSES, port=st.integers(0, 70_000))
def test_a_hop_with_a_port_gives_its_address_and_a_port_past_65535_none(
    address: str, port: int
) -> None:
    found = forwarded_address(f"{address}:{port}")
    assert (None if port > 65_535 else address.strip("[]")) == (found and str(found))


@given(text=st.one_of(st.text(alphabet="0123456789abcdef.:[] ", max_size=45), st.text()))
def test_any_hop_text_is_an_address_or_none_never_an_error(text: str) -> None:
    found = forwarded_address(text)
    assert found is None or found.version in (4, 6)
    if found is not None and found.version == 4:  # bare, or followed by its port alone
        assert text == str(found) or text.startswith(f"{found}:") or ip_address(text) == found
