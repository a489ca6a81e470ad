"""The address per-IP limits count: X-Forwarded-For only through trusted proxies, and then
only what they appended; an IPv6 client as its /64."""

from __future__ import annotations

import dataclasses
from ipaddress import ip_network
from typing import Any
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from flashsale.errors import ConfigError
from flashsale.settings import Settings
from gateway.http import client_ip
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
