"""Signed tokens: round trip, rotation, and that nothing but an untouched valid token passes."""

from __future__ import annotations

import base64
import functools
import hmac
import http.server
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashsale.cli.devstack.processes import free_port
from flashsale.errors import InvalidToken
from flashsale.settings import Settings
from flashsale.tokens import Signer, _Key, buyer_subject
from tests.conftest import Cli
from tests.harness import create_live_sale, live_gateway

SECRET = "s" * 32
OLD = "o" * 32


def test_round_trip_and_claims() -> None:
    signer = Signer([SECRET], "buyer")
    claims = signer.verify(signer.sign({"sub": "alice"}, ttl_s=60))
    assert claims["sub"] == "alice" and claims["typ"] == "buyer"
    assert claims["exp"] > time.time()


def test_expired_tokens_are_refused() -> None:
    signer = Signer([SECRET], "buyer")
    token = signer.sign({"sub": "a"}, ttl_s=10, now=1_000)
    assert signer.verify(token, now=1_005)["sub"] == "a"
    with pytest.raises(InvalidToken) as caught:
        signer.verify(token, now=1_010)
    assert caught.value.reason == "expired"


def test_one_kind_never_passes_as_another() -> None:
    # Same secret, different kinds: the derived keys differ, so the signature fails.
    ticket = Signer([SECRET], "ticket").sign({"sub": "a"}, ttl_s=60)
    with pytest.raises(InvalidToken) as caught:
        Signer([SECRET], "admission").verify(ticket)
    assert caught.value.reason == "signature"


def test_rotation_old_tokens_verify_new_ones_are_signed_with_the_first() -> None:
    old_token = Signer([OLD], "buyer").sign({"sub": "a"}, ttl_s=60)
    rotated = Signer.from_setting(f"{SECRET}, {OLD}", "buyer")
    assert rotated.verify(old_token)["sub"] == "a"
    new_token = rotated.sign({"sub": "b"}, ttl_s=60)
    assert Signer([SECRET], "buyer").verify(new_token)["sub"] == "b"
    with pytest.raises(InvalidToken) as caught:
        Signer([OLD], "buyer").verify(new_token)
    assert caught.value.reason == "unknown_key"


def test_short_or_missing_secrets_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        Signer(["short"], "buyer")
    with pytest.raises(ValueError, match="no secret"):
        Signer.from_setting(" , ", "buyer")


def test_forged_claims_fail_the_signature() -> None:
    signer = Signer([SECRET], "buyer")
    version, kid, _claims, sig = signer.sign({"sub": "alice"}, ttl_s=60).split(".")
    forged = base64.urlsafe_b64encode(b'{"sub":"mallory","typ":"buyer","exp":9999999999}')
    with pytest.raises(InvalidToken) as caught:
        signer.verify(".".join([version, kid, forged.decode().rstrip("="), sig]))
    assert caught.value.reason == "signature"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_strings_only_ever_raise_invalid_token(text: str) -> None:
    with pytest.raises(InvalidToken):
        Signer([SECRET], "buyer").verify(text)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_change_to_a_valid_token_is_refused(data: st.DataObject) -> None:
    signer = Signer([SECRET], "buyer")
    token = signer.sign({"sub": "alice"}, ttl_s=60)
    alphabet = "abcdefABCDEF0123456789-_.=v"
    at = data.draw(st.integers(0, len(token)))
    cut = data.draw(st.integers(0, 3))
    insert = data.draw(st.text(alphabet, max_size=3))
    mutated = token[:at] + insert + token[at + cut :]
    if mutated == token:
        return
    with pytest.raises(InvalidToken):
        signer.verify(mutated)


def test_cli_mints_tokens_that_verify(run_cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASHSALE_BUYER_TOKEN_SECRET", SECRET)
    result = run_cli("token", "buyers", "--count", "3", "--prefix", "load-")
    assert result.code == 0, result.err
    lines = [line.split("\t") for line in result.out.splitlines()]
    assert [buyer for buyer, _ in lines] == ["load-0", "load-1", "load-2"]
    signer = Signer([SECRET], "buyer")
    assert [signer.verify(token)["sub"] for _, token in lines] == ["load-0", "load-1", "load-2"]


def test_cli_prints_each_buyers_link_to_the_waiting_room(
    run_cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`flashsale up` names a sale's waiting room, and opened as it is the page says "Open this
    page from the shop": someone trying their sale had to put the link together by hand from
    the README. With --page, each line ends with the buyer's own link."""
    monkeypatch.setenv("FLASHSALE_BUYER_TOKEN_SECRET", SECRET)
    nowhere = f"http://127.0.0.1:{free_port()}"  # no gateway to check the sale with
    page = f"{nowhere}/sales/sale-1?sku=A"
    result = run_cli("token", "buyers", "--count", "2", "--prefix", "try-", "--page", page,
                     "--payment", "tok_decline")  # fmt: skip
    assert result.code == 0, result.err
    for n, line in enumerate(result.out.splitlines()):
        buyer, token, link = line.split("\t")
        assert buyer == f"try-{n}" and link == f"{page}#token={token}&payment=tok_decline", line
    plain = run_cli("token", "buyers", "--page", f"{nowhere}/sales/sale-1")
    assert plain.out.strip().endswith("&payment=tok_visa"), plain.out  # the simulator captures it
    assert plain.err.startswith(f"flashsale: warning: could not ask {nowhere} whether it has "
                                "sale sale-1"), plain.err  # fmt: skip
    for bad in (
        "127.0.0.1:8080/sales/sale-1",
        "http://127.0.0.1:8080/admin/",
        "http://127.0.0.1:8080/sales/sale-1#token=x",
        "ftp://h/sales/s",
    ):
        refused = run_cli("token", "buyers", "--page", bad)
        assert refused.code == 2 and refused.err.startswith("flashsale: error: --page: "), (
            bad, refused.err)  # fmt: skip
    assert run_cli("token", "buyers", "--payment", "tok_visa").code == 2  # without --page


def test_cli_links_no_buyer_to_a_sale_the_gateway_does_not_have(
    stack: Settings, run_cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`flashsale up` names the page `/sales/SALE`, and `--page` took that (or an id mistyped)
    as it was: every link opened "This sale does not exist". The gateway the link names is
    asked first."""
    monkeypatch.setenv("FLASHSALE_BUYER_TOKEN_SECRET", SECRET)
    with live_gateway(stack) as gw:
        sale = create_live_sale(gw.base_url, stock=1)
        good = run_cli("token", "buyers", "--page", f"{gw.base_url}/sales/{sale}")
        assert (good.code, good.err) == (0, ""), good.err
        assert good.out.count(f"/sales/{sale}#token=") == 1, good.out
        placeholder = run_cli("token", "buyers", "--page", f"{gw.base_url}/sales/SALE")
        assert (placeholder.code, placeholder.out) == (2, ""), placeholder
        assert placeholder.err == (
            f"flashsale: error: --page: {gw.base_url} has no sale 'SALE': the links would open "
            '"This sale does not exist" (`flashsale sale list` names the sales)\n'
        ), placeholder.err


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def test_cli_links_no_buyer_to_an_address_that_is_no_gateway(
    run_cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A page at another server (a port mistyped: the reconciler's probes, a shop) was told
    "has no sale 'S': the links would open \"This sale does not exist\"", which that server
    does not serve: any 404 was taken for the gateway's."""
    monkeypatch.setenv("FLASHSALE_BUYER_TOKEN_SECRET", SECRET)
    handler = functools.partial(_Quiet, directory=str(tmp_path))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as other:
        threading.Thread(target=other.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{other.server_address[1]}"
        try:
            refused = run_cli("token", "buyers", "--page", f"{base}/sales/sale-1")
        finally:
            other.shutdown()
    assert (refused.code, refused.out) == (2, ""), refused
    assert refused.err == (
        f"flashsale: error: --page: {base} answered 404 to /v1/sales/sale-1: no flashsale "
        "gateway is there, and the links would not open its waiting room\n"
    ), refused.err


def test_cli_takes_a_lifetime_as_a_duration(run_cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--ttl 1h` was refused as "a positive number"; `sale create --starts-in 1h` takes it."""
    monkeypatch.setenv("FLASHSALE_BUYER_TOKEN_SECRET", SECRET)
    result = run_cli("token", "buyers", "--count", "1", "--ttl", "1h30m")
    assert result.code == 0, result.err
    claims = Signer([SECRET], "buyer").verify(result.out.split("\t")[1].strip())
    assert claims["exp"] - time.time() == pytest.approx(5400, abs=5), claims


def test_cli_mints_any_buyer_id_the_gateway_takes(
    run_cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A buyer id is what the storefront calls its buyer (1 to 128 printable ASCII
    characters: an email, ``shop:42``), not a sale's kind of id of at most 64 letters, digits,
    '.', '_' and '-'."""
    monkeypatch.setenv("FLASHSALE_BUYER_TOKEN_SECRET", SECRET)
    for prefix in ("shop:user@example.com#", "b" * 120):
        result = run_cli("token", "buyers", "--count", "2", "--prefix", prefix)
        assert result.code == 0, result.err
        tokens = [line.split("\t")[1] for line in result.out.splitlines()]
        assert [buyer_subject(Signer([SECRET], "buyer").verify(t)) for t in tokens] == [
            f"{prefix}0",
            f"{prefix}1",
        ]


@pytest.mark.parametrize(
    ("args", "field"),
    [(["--count", "-1"], "--count"), (["--ttl", "x"], "--ttl"), (["--prefix", "a b"], "--prefix"),
     # float() reads these: tracebacks where a number was due
     (["--ttl", "inf"], "--ttl"), (["--ttl", "nan"], "--ttl"), (["--ttl", "1e300"], "--ttl"),
     # the last buyer's id, not the first's, past the 128 characters a buyer id may have
     (["--prefix", "p" * 127, "--count", "11"], "--prefix")],
)  # fmt: skip
def test_cli_bad_input(run_cli: Cli, monkeypatch: pytest.MonkeyPatch, args: list[str],
                       field: str) -> None:  # fmt: skip
    monkeypatch.setenv("FLASHSALE_BUYER_TOKEN_SECRET", SECRET)
    result = run_cli("token", "buyers", *args)
    assert result.code == 2 and result.out == ""
    assert result.err.startswith(f"flashsale: error: {field}:")


def test_signature_has_one_spelling() -> None:
    """base64 leaves spare bits in the last character: variants decode to the same bytes and
    must still be refused, or one token would have many valid spellings."""
    signer = Signer([SECRET], "buyer")
    token = signer.sign({"sub": "alice"}, ttl_s=60)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    passed = []
    for c in alphabet:
        try:
            signer.verify(token[:-1] + c)
            passed.append(c)
        except InvalidToken:
            pass
    assert passed == [token[-1]]
    with pytest.raises(InvalidToken):
        signer.verify(token + "=")


@given(key=st.binary(min_size=0, max_size=64), message=st.binary(max_size=512))
@settings(max_examples=300)
def test_prepared_hmac_equals_the_standard_library(key: bytes, message: bytes) -> None:
    """The hand-rolled HMAC (prepared pads) agrees with hmac.digest for every key and message
    a token can meet."""
    assert _Key("kid", key).mac(message) == hmac.digest(key, message, "sha256")


def test_remembered_tokens_still_expire_and_forgeries_are_never_remembered() -> None:
    signer = Signer([SECRET], "ticket", remember=2)
    token = signer.sign({"sub": "a", "p": 1}, ttl_s=10, now=1_000)
    first = signer.verify(token, now=1_001)
    assert signer.verify(token, now=1_002) is first  # the second presentation is a lookup
    with pytest.raises(InvalidToken) as caught:
        signer.verify(token, now=1_010)  # remembered, but expired all the same
    assert caught.value.reason == "expired"
    forged = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    for _ in range(2):
        with pytest.raises(InvalidToken):
            signer.verify(forged, now=1_001)
    others = [signer.sign({"sub": f"b{i}", "p": i}, ttl_s=10, now=1_000) for i in range(5)]
    for other in others:
        signer.verify(other, now=1_001)
    assert len(signer._verified) == 2  # bounded: the oldest are forgotten
    assert signer.verify(others[0], now=1_001)["sub"] == "b0"  # forgotten, verified again
