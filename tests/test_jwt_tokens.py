"""Storefront JWTs as buyer tokens: HS256 with the shared secret, ES256 and RS256 with a JWKS,
every refusal with a stable reason, no algorithm confusion; and a join through the real
gateway with each kind."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from flashsale.errors import ConfigError, InvalidToken
from flashsale.jwks import load_jwks
from flashsale.settings import Settings
from flashsale.tokens import BuyerTokens, Signer
from tests.harness import gateway
from tests.tls_authority import make_authority

SECRET = "storefront-shared-secret-0123456789"
EC_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwks_file(tmp_path: Path) -> str:
    keys = []
    for kid, key, alg in (("ec-1", EC_KEY, "ES256"), ("rsa-1", RSA_KEY, "RS256")):
        jwk = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(key.public_key()))
        keys.append({**jwk, "kid": kid, "alg": alg, "use": "sig"})
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": keys}))
    return str(path)


def tokens(tmp_path: Path, audience: str | None = None) -> BuyerTokens:
    return BuyerTokens(Signer([SECRET], "buyer"), [SECRET], load_jwks(jwks_file(tmp_path)),
                       audience)  # fmt: skip


def claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "buyer-42", "exp": int(time.time()) + 600, **extra}


def test_each_algorithm_verifies_and_repeats_come_from_the_cache(tmp_path: Path) -> None:
    t = tokens(tmp_path)
    made = (
        jwt.encode(claims(), SECRET, algorithm="HS256"),
        jwt.encode(claims(), EC_KEY, algorithm="ES256", headers={"kid": "ec-1"}),
        jwt.encode(claims(), RSA_KEY, algorithm="RS256", headers={"kid": "rsa-1"}),
    )
    for token in made:
        assert t.verify(token)["sub"] == "buyer-42"
        assert t.verify(token) is t.verify(token)  # the remembered claims
    assert t.verify(t.sign({"sub": "v1-buyer"}, 60))["sub"] == "v1-buyer"  # the v1 format too


@pytest.mark.parametrize(("make", "reason"), [
    (lambda: jwt.encode(claims(exp=int(time.time()) - 60), SECRET, algorithm="HS256"), "expired"),
    (lambda: jwt.encode(claims(nbf=int(time.time()) + 600), SECRET, algorithm="HS256"),
     "not_yet_valid"),
    (lambda: jwt.encode({"sub": "x"}, SECRET, algorithm="HS256"), "claims"),  # no exp
    (lambda: jwt.encode(claims(), "another-secret-of-enough-length!", algorithm="HS256"),
     "signature"),
    (lambda: jwt.encode(claims(), EC_KEY, algorithm="ES256", headers={"kid": "nope"}),
     "unknown_key"),
    (lambda: jwt.encode(claims(), EC_KEY, algorithm="ES256", headers={"kid": "rsa-1"}),
     "unknown_key"),  # a kid of another algorithm
    (lambda: jwt.encode(claims(), "", algorithm="none"), "algorithm"),
    (lambda: "not.a.jwt", "malformed"),
])  # fmt: skip
def test_refusals_name_their_reason(tmp_path: Path, make: Any, reason: str) -> None:
    with pytest.raises(InvalidToken) as refused:
        tokens(tmp_path).verify(make())
    assert refused.value.reason == reason


def test_a_storefronts_exp_as_seconds_with_a_fraction_is_valid_and_bad_claims_say_which(
    tmp_path: Path,
) -> None:
    """``exp`` is a NumericDate, which may have a fraction (RFC 7519 §2): Python's
    ``time.time() + 3600`` makes one, and every such token was refused as "token expired". An
    ``exp`` written as text was refused as expired too, and a numeric ``sub`` (a user id) as
    "malformed": each now names the claim at fault."""
    t = tokens(tmp_path)
    later = time.time() + 600.5
    assert t.verify(jwt.encode({"sub": "buyer-7", "exp": later}, SECRET))["sub"] == "buyer-7"
    gone = jwt.encode({"sub": "buyer-8", "exp": time.time() - 60.5}, SECRET)
    for token, reason, said in (
        (gone, "expired", "token expired"),
        (jwt.encode({"sub": "buyer-9", "exp": str(int(later))}, SECRET), "claims", "exp"),
        (jwt.encode({"sub": 42, "exp": int(later)}, SECRET), "claims", "sub"),
        (
            jwt.encode({"sub": "b", "exp": later}, SECRET + SECRET, algorithm="HS512"),
            "algorithm",
            "must be HS256, ES256 or RS256",
        ),  # it said "one of ('HS256', 'ES256', 'RS256')"
    ):
        with pytest.raises(InvalidToken) as refused:
            t.verify(token)
        assert (refused.value.reason, said in refused.value.message) == (reason, True), (
            refused.value.message
        )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_no_algorithm_confusion_and_the_audience_is_enforced(tmp_path: Path) -> None:
    t = tokens(tmp_path, audience="flashsale")
    # An HS256 token MACed with the ES256 public key's PEM (the classic confusion attack;
    # built by hand, since pyjwt refuses PEM keys for HMAC): only the shared secret checks
    # an HS256 token, so it fails.
    pem = EC_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = _b64(json.dumps({"alg": "HS256", "kid": "ec-1", "typ": "JWT"}).encode())
    head = f"{header}.{_b64(json.dumps(claims(aud='flashsale')).encode())}"
    forged = f"{head}.{_b64(hmac.new(pem, head.encode(), hashlib.sha256).digest())}"
    with pytest.raises(InvalidToken) as refused:
        t.verify(forged)
    assert refused.value.reason == "signature"
    with pytest.raises(InvalidToken) as refused:
        t.verify(jwt.encode(claims(aud="someone-else"), SECRET, algorithm="HS256"))
    assert refused.value.reason == "claims"
    assert t.verify(jwt.encode(claims(aud="flashsale"), SECRET, algorithm="HS256"))


def test_a_jwks_file_saved_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    path = Path(jwks_file(tmp_path))
    path.write_bytes(path.read_text().encode("utf-8-sig"))  # as Windows PowerShell saves it
    assert sorted(load_jwks(str(path))) == ["ec-1", "rsa-1"]


def test_a_bad_jwks_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="FLASHSALE_BUYER_JWKS"):
        load_jwks(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}))
    with pytest.raises(ConfigError, match="FLASHSALE_BUYER_JWKS"):
        load_jwks(str(bad))


def test_a_jwks_url_whose_certificate_is_not_trusted_is_said_so(tmp_path: Path) -> None:
    """A JWKS URL on https with a certificate of the storefront's own CA stopped the gateway
    with "<urlopen error [SSL: CERTIFICATE_VERIFY_FAILED] …>", and nothing said what the
    engine trusts instead."""
    authority = make_authority(tmp_path)
    provider = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    provider.socket = authority.server.wrap_socket(provider.socket, server_side=True)
    threading.Thread(target=provider.serve_forever, daemon=True).start()
    url = f"https://127.0.0.1:{provider.server_address[1]}/jwks.json"
    try:
        with pytest.raises(ConfigError) as refused:
            load_jwks(url)
    finally:
        provider.shutdown()
        provider.server_close()
    assert str(refused.value) == (
        f"FLASHSALE_BUYER_JWKS: cannot load {url}: the certificate of the server is not "
        "trusted: unable to get local issuer certificate; the engine trusts the system's CAs, "
        "or those of the bundle SSL_CERT_FILE names"
    )


def test_a_providers_other_keys_are_left_out_not_the_whole_set(tmp_path: Path) -> None:
    """An identity provider publishes more than its signing keys: Keycloak an RSA-OAEP key
    for encryption, others an RS384, PS256 or EdDSA key beside RS256. Any one of them refused
    the whole set, so no gateway could start; and a key marked for encryption (`use: enc`)
    verified tokens."""
    path = Path(jwks_file(tmp_path))
    usable = json.loads(path.read_text())["keys"]
    rsa_jwk = {k: v for k, v in usable[1].items() if k not in ("kid", "alg", "use")}
    others = [
        {**rsa_jwk, "kid": "enc-1", "alg": "RSA-OAEP", "use": "enc"},
        {**rsa_jwk, "kid": "enc-2", "use": "enc"},  # no alg: its kind alone would say RS256
        {**rsa_jwk, "kid": "rs384", "alg": "RS384"},
        {**rsa_jwk, "kid": "ps256", "alg": "PS256"},
        {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo",
         "kid": "ed-1", "alg": "EdDSA"},
    ]  # fmt: skip
    path.write_text(json.dumps({"keys": usable + others}))
    assert sorted(load_jwks(str(path))) == ["ec-1", "rsa-1"]
    path.write_text(json.dumps({"keys": others}))
    with pytest.raises(ConfigError) as refused:
        load_jwks(str(path))
    assert str(refused.value) == (
        f"FLASHSALE_BUYER_JWKS: {path} has no key for verifying buyer tokens (ES256 or RS256, "
        "with a kid, not marked for encryption); its keys: enc-1 (RSA-OAEP, use enc), enc-2 "
        "(use enc), rs384 (RS384), ps256 (PS256), ed-1 (EdDSA)"
    )


async def test_storefront_jwts_join_through_the_gateway(stack: Settings, tmp_path: Path) -> None:
    async with gateway(stack, buyer_jwks=jwks_file(tmp_path)) as gw:
        sale = await gw.create_sale(stock=5)
        secret = stack.buyer_token_secret.reveal().split(",")[0]
        for buyer, token in (
            ("jwt-hs", jwt.encode(claims(sub="jwt-hs"), secret, algorithm="HS256")),
            ("jwt-es", jwt.encode(claims(sub="jwt-es"), EC_KEY, algorithm="ES256",
                                  headers={"kid": "ec-1"})),
        ):  # fmt: skip
            joined = await gw.http.post(f"/v1/sales/{sale}/queue",
                                        headers={"Authorization": f"Bearer {token}"})  # fmt: skip
            assert joined.status == 200, await joined.text()
            body = await joined.json()
            assert body["state"] in ("waiting", "admitted"), body
            status = await gw.http.get(f"/v1/sales/{sale}/queue/status",
                                       headers={"X-Queue-Ticket": body["ticket"]})  # fmt: skip
            assert status.status == 200  # the ticket names the JWT's buyer
            bearer = {"Authorization": f"Bearer {token}"}
            reservation = await gw.http.get(f"/v1/reservations/{sale}~SKU-1~r-x", headers=bearer)
            assert reservation.status == 404, buyer  # authenticated, nothing of theirs
        late = jwt.encode(claims(exp=int(time.time()) - 60), secret, algorithm="HS256")
        refused = await gw.http.post(f"/v1/sales/{sale}/queue",
                                     headers={"Authorization": f"Bearer {late}"})  # fmt: skip
        assert refused.status == 401


def test_the_documented_v1_recipe_makes_tokens_the_gateway_accepts() -> None:
    """docs/TOKENS.md gives storefront developers a standard-library recipe: run it as
    written and check its token with the engine's own verifier."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "TOKENS.md").read_text()
    recipe = doc.split("## The v1 format", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    scope: dict[str, Any] = {}
    exec(recipe, scope)  # noqa: S102 - our own documentation
    token = scope["buyer_token"](SECRET, "doc-buyer")
    assert Signer([SECRET], "buyer").verify(token)["sub"] == "doc-buyer"


async def test_a_key_the_storefront_added_since_the_start_is_fetched(
    stack: Settings,
) -> None:
    """An identity provider rotates its keys by publishing the new one and then signing with
    it. A token whose kid the gateway does not know sends it to the JWKS URL again (at most
    every JWKS_REFETCH_S, so made-up kids cannot hammer the provider), instead of refusing
    every buyer of the new key until the gateways restart."""
    new_key = ec.generate_private_key(ec.SECP256R1())
    published = [("ec-1", EC_KEY)]
    fetches = []

    class Provider(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            fetches.append(self.path)
            to_jwk = jwt.algorithms.ECAlgorithm.to_jwk
            keys = [{**json.loads(to_jwk(key.public_key())), "kid": kid, "alg": "ES256"}
                    for kid, key in published]  # fmt: skip
            body = json.dumps({"keys": keys}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: Any) -> None:
            pass

    provider = ThreadingHTTPServer(("127.0.0.1", 0), Provider)
    threading.Thread(target=provider.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{provider.server_address[1]}/jwks.json"
    try:
        async with gateway(stack, buyer_jwks=url) as gw:
            sale = await gw.create_sale(stock=5)

            async def join(kid: str, key: Any, buyer: str) -> int:
                token = jwt.encode(claims(sub=buyer), key, algorithm="ES256",
                                   headers={"kid": kid})  # fmt: skip
                bearer = {"Authorization": f"Bearer {token}"}
                return (await gw.http.post(f"/v1/sales/{sale}/queue", headers=bearer)).status

            assert await join("ec-1", EC_KEY, "old-key") == 200
            assert len(fetches) == 1  # read when the gateway started
            published.append(("ec-2", new_key))  # the provider rotates
            assert await join("ec-2", new_key, "new-key") == 200
            assert len(fetches) == 2
            for i in range(5):  # kids nobody published: refused, the provider left alone
                assert await join(f"made-up-{i}", new_key, f"forger-{i}") == 401
            assert len(fetches) == 2
    finally:
        provider.shutdown()
        provider.server_close()
