"""Signed tokens: buyer identity, queue tickets and admission tokens, and the gateway's signers.

Format (version 1), four dot-separated parts, all URL-safe::

    v1.<kid>.<claims>.<signature>

* ``kid``: the key id, 8 hex characters of SHA-256 over the signing key. Several secrets can be
  in force at once (``FLASHSALE_..._SECRET=new,old``): the first signs and all verify, so
  secrets rotate without logging anyone out.
* ``claims``: base64url (no padding) of a compact JSON object. Always ``typ`` (the token kind)
  and ``exp`` (Unix seconds); ``sub`` is the buyer id; other claims depend on the kind.
* ``signature``: base64url of HMAC-SHA256 over ``v1.<kid>.<claims>`` with a key derived from
  the secret *and the kind*, so a token of one kind can never pass as another even when the
  same secret signs both.

A direct HMAC check costs a few microseconds, where a JWT library costs tens; and the format
has nothing to negotiate (no ``alg`` header), so there is no algorithm-confusion attack.
Verification checks, in order: shape, version, key id, signature (constant time), claims
JSON, kind, expiry. Every failure is a :class:`~flashsale.errors.InvalidToken` with a stable
``reason``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from flashsale.env_values import secret_setting
from flashsale.errors import ConfigError, InvalidToken, Unauthorized, shown
from flashsale.inflight import InFlight
from flashsale.jwks import load_jwks
from flashsale.settings import Secret, Settings

VERSION = "v1"
TokenKind = Literal["buyer", "ticket", "admission", "challenge"]
MAX_TOKEN_LENGTH = 2048  # a token longer than this is refused before any work

log = logging.getLogger("flashsale.tokens")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class _Key:
    """One signing key: HMAC-SHA256 with its padded inner and outer states hashed once.

    ``mac(m)`` is exactly ``hmac.digest(mac_key, m, "sha256")`` (RFC 2104), but copies two
    prepared SHA-256 states instead of setting up an HMAC context per call, which OpenSSL 3
    makes cost about twice as much (8 µs against 4 µs per token here).
    """

    __slots__ = ("_inner", "_outer", "kid", "mac_key")

    def __init__(self, kid: str, mac_key: bytes) -> None:
        self.kid = kid
        self.mac_key = mac_key
        if len(mac_key) > 64:  # RFC 2104 would hash it first; derived keys are 32 bytes
            raise ValueError("an HMAC-SHA256 key of at most one block (64 bytes) is expected")
        block = mac_key.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))

    def mac(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


class Signer:
    """Signs and verifies one kind of token with one or more secrets (first one signs)."""

    def __init__(self, secrets: Iterable[str], kind: TokenKind, *, remember: int = 0) -> None:
        """``remember`` > 0 keeps that many verified tokens (exact strings) with their claims,
        so a token presented again costs a dict lookup and an expiry check: for queue tickets,
        which every waiting buyer presents on each poll. Only tokens that passed every check
        are kept, and the key set cannot change in a running process."""
        keys: list[_Key] = []
        for secret in secrets:
            raw = secret.encode()
            if len(raw) < 16:
                raise ValueError(f"a {kind} token secret must be at least 16 characters")
            kid = hashlib.sha256(raw).hexdigest()[:8]
            mac_key = hmac.new(raw, f"flashsale:{kind}".encode(), hashlib.sha256).digest()
            keys.append(_Key(kid, mac_key))
        if not keys:
            raise ValueError(f"no secret configured for {kind} tokens")
        self.kind = kind
        self._signing = keys[0]
        self._by_kid = {k.kid: k for k in keys}
        self._remember = remember
        self._verified: dict[str, dict[str, Any]] = {}

    @classmethod
    def from_setting(cls, value: str, kind: TokenKind, *, remember: int = 0) -> Signer:
        """From a setting holding one secret or several, comma-separated (first signs)."""
        return cls(list(Secret(value).each_key()), kind, remember=remember)

    def sign(self, claims: dict[str, Any], ttl_s: float, now: float | None = None) -> str:
        now = time.time() if now is None else now
        body = {**claims, "typ": self.kind, "exp": int(now + ttl_s)}
        head = f"{VERSION}.{self._signing.kid}.{_b64(orjson.dumps(body))}"
        mac = self._signing.mac(head.encode())
        return f"{head}.{_b64(mac)}"

    def verify(self, token: str, now: float | None = None) -> dict[str, Any]:
        """The token's claims (shared with the cache when ``remember`` is on: read them, do
        not change them); raises InvalidToken."""
        if self._remember:
            known = self._verified.get(token)
            if known is not None:
                if known["exp"] <= (time.time() if now is None else now):
                    del self._verified[token]
                    raise InvalidToken("expired", "token expired")
                return known
        claims = self._verify(token, now)
        if self._remember:
            if len(self._verified) >= self._remember:
                del self._verified[next(iter(self._verified))]  # the oldest entry
            self._verified[token] = claims
        return claims

    def _verify(self, token: str, now: float | None) -> dict[str, Any]:
        if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
            raise InvalidToken("malformed")
        parts = token.split(".")
        if len(parts) != 4:
            raise InvalidToken("malformed")
        version, kid, claims_b64, sig_b64 = parts
        if version != VERSION:
            raise InvalidToken("version")
        key = self._by_kid.get(kid)
        if key is None:
            raise InvalidToken("unknown_key")
        head = token[: len(token) - len(sig_b64) - 1]
        # Comparing the canonical encoding of the expected MAC admits one spelling per
        # signature (no malleable variants) and saves decoding the one given.
        expected = _b64(key.mac(head.encode()))
        if not hmac.compare_digest(sig_b64.encode(), expected.encode()):
            raise InvalidToken("signature")
        try:
            claims = orjson.loads(_unb64(claims_b64))
        except (binascii.Error, ValueError, orjson.JSONDecodeError):
            raise InvalidToken("malformed") from None
        if not isinstance(claims, dict) or claims.get("typ") != self.kind:
            raise InvalidToken("kind")
        exp = claims.get("exp")
        if not isinstance(exp, int) or isinstance(exp, bool):
            raise InvalidToken("malformed")
        if exp <= (time.time() if now is None else now):
            raise InvalidToken("expired", "token expired")
        return claims


def unverified_claims(token: str) -> dict[str, Any]:
    """The claims of a v1 token, read without checking anything: for load tools that look at
    what the engine answered, never for deciding who someone is."""
    claims: dict[str, Any] = orjson.loads(_unb64(token.split(".")[2]))
    return claims


# A buyer id is stored as it is (Redis hashes, Postgres text, logs): printable ASCII, no space.
BUYER_ID = re.compile(r"[\x21-\x7e]{1,128}\Z")


def buyer_subject(claims: dict[str, Any]) -> str:
    """The buyer id of verified buyer-token claims. Raises Unauthorized
    (``invalid_buyer_id``) for one that is not 1 to 128 printable ASCII characters without
    spaces: the storefront signs what it likes, and the engine stores it as it is."""
    sub = claims.get("sub")
    if not isinstance(sub, str) or not BUYER_ID.match(sub):
        raise Unauthorized(
            "the token's buyer id (sub) must be 1 to 128 printable ASCII characters, no spaces",
            code="invalid_buyer_id",
        )
    return sub


TICKETS_REMEMBERED = 100_000  # per process: about 70 MB when full (claims, token strings)
JWTS_REMEMBERED = 100_000  # verified storefront JWTs kept per process, the same way
JWT_LEEWAY_S = 5  # clock skew allowed on exp and nbf
# A kid the gateway does not know sends it to the storefront's JWKS again, at most this often:
# made-up kids cannot make it hammer the provider.
JWKS_REFETCH_S = 10.0


class BuyerTokens:
    """Buyer tokens, in either of two formats, told apart by their first part:

    * the engine's own ``v1.`` format above (HMAC-SHA256 with ``FLASHSALE_BUYER_TOKEN_SECRET``);
    * a standard JWT from the storefront: HS256 with the same shared secret, or ES256 / RS256
      with a public key of the configured JWKS (``FLASHSALE_BUYER_JWKS``), chosen by ``kid``.
      ``exp`` and ``sub`` are required, ``nbf`` is honoured (5 s leeway on both), and ``aud``
      must name ``FLASHSALE_BUYER_JWT_AUDIENCE`` when that is set. The algorithm comes from
      the key, never from the token alone: an HS256 token is only checked with the shared
      secret, an ES256 or RS256 one only with a public key of that algorithm.

    A JWT that verified is remembered (``JWTS_REMEMBERED``), so a buyer's later requests with
    the same token cost a lookup and an expiry check, as the v1 format's check does.
    """

    def __init__(self, v1: Signer, secrets: Iterable[str], public_keys: dict[str, Any],
                 audience: str | None = None, *, jwks: str | None = None) -> None:  # fmt: skip
        """``jwks``: where ``public_keys`` came from, read again for a kid not among them."""
        self.v1 = v1
        self._secrets = [s.encode() for s in secrets]
        self._public = public_keys  # kid -> jwt.PyJWK
        self._audience = audience
        self._verified: dict[str, dict[str, Any]] = {}
        self._jwks = jwks
        self._jwks_read_again_at = -JWKS_REFETCH_S  # when an unknown kid last had it read
        self._reading: InFlight[str, bool] = InFlight()

    async def verify_fetching(self, token: str) -> dict[str, Any]:
        """:meth:`verify`, and for an ES256 or RS256 token whose ``kid`` is not among the
        keys, the JWKS read again once (in a thread; at most every ``JWKS_REFETCH_S``, one
        read for every such token meanwhile): the storefront published a key since."""
        try:
            return self.verify(token)
        except InvalidToken as exc:
            if exc.reason != "unknown_key" or not await self._reading.once("jwks", self._refetch):
                raise
        return self.verify(token)

    async def _refetch(self) -> bool:
        """Whether the JWKS was read again (and brought keys not known before)."""
        if self._jwks is None or time.monotonic() - self._jwks_read_again_at < JWKS_REFETCH_S:
            return False
        self._jwks_read_again_at = time.monotonic()
        try:
            keys = await asyncio.to_thread(load_jwks, self._jwks)
        except ConfigError as exc:
            log.warning("the storefront's keys were not read again: %s", exc.message)
            return False
        added = set(keys) - set(self._public)
        self._public = keys
        if added:
            log.info("storefront keys added: %s", ", ".join(sorted(added)))
        return bool(added)

    def sign(self, claims: dict[str, Any], ttl_s: float, now: float | None = None) -> str:
        """A token in the engine's v1 format (the storefront may sign JWTs instead)."""
        return self.v1.sign(claims, ttl_s, now)

    def verify(self, token: str, now: float | None = None) -> dict[str, Any]:
        """The token's claims; raises InvalidToken with a stable reason."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
            raise InvalidToken("malformed")
        if token.startswith(f"{VERSION}."):
            return self.v1.verify(token, now)
        at = time.time() if now is None else now
        known = self._verified.get(token)
        if known is not None:
            if known["exp"] + JWT_LEEWAY_S <= at:
                del self._verified[token]
                raise InvalidToken("expired", "token expired")
            return known
        claims = self._jwt(token, at)
        if len(self._verified) >= JWTS_REMEMBERED:
            del self._verified[next(iter(self._verified))]
        self._verified[token] = claims
        return claims

    def _jwt(self, token: str, at: float) -> dict[str, Any]:
        import jwt  # noqa: PLC0415 - only deployments with storefront JWTs load it

        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("malformed") from None
        alg = header.get("alg")
        if alg == "HS256":
            keys: list[Any] = list(self._secrets)
        elif alg in ("ES256", "RS256"):
            found = self._public.get(str(header.get("kid")))
            if found is None or found.algorithm_name != alg:
                raise InvalidToken("unknown_key", "no public key for this token's kid and alg")
            keys = [found.key]
        else:
            raise InvalidToken("algorithm", "token algorithm must be HS256, ES256 or RS256, "
                               f"not {shown(alg)}")  # fmt: skip
        reason = "signature"
        for key in keys:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token, key, algorithms=[alg], audience=self._audience, leeway=JWT_LEEWAY_S,
                    options={"require": ["exp", "sub"], "verify_aud": self._audience is not None},
                )  # fmt: skip
            except jwt.InvalidSignatureError:
                continue
            except jwt.ExpiredSignatureError:
                raise InvalidToken("expired", "token expired") from None
            except jwt.ImmatureSignatureError:
                raise InvalidToken("not_yet_valid", "token not valid yet (nbf)") from None
            except (jwt.InvalidAudienceError, jwt.MissingRequiredClaimError) as exc:
                raise InvalidToken("claims", str(exc)) from None
            except jwt.exceptions.InvalidSubjectError:
                raise InvalidToken("claims", "sub must be a string: the buyer id") from None
            except jwt.PyJWTError:
                reason = "malformed"
                continue
            # A NumericDate: seconds, a fraction allowed (RFC 7519); PyJWT takes text too.
            exp = claims["exp"]
            if isinstance(exp, bool) or not isinstance(exp, int | float):
                raise InvalidToken("claims", "exp must be a number: seconds since 1970, UTC")
            if exp + JWT_LEEWAY_S <= at:
                raise InvalidToken("expired", "token expired")
            return claims
        raise InvalidToken(reason)


@dataclass(frozen=True, slots=True)
class Signers:
    """Buyer tokens are the storefront's (``FLASHSALE_BUYER_TOKEN_SECRET``); queue tickets and
    admission tokens are the engine's own (``FLASHSALE_SECRET``)."""

    buyer: BuyerTokens
    ticket: Signer
    admission: Signer
    challenge: Signer

    @classmethod
    def from_settings(cls, settings: Settings) -> Signers:
        """Raises ConfigError when either secret is missing, or one of its keys is shorter
        than 16 characters."""
        buyer, own = settings.buyer_token_secret.reveal(), settings.secret.reveal()
        for name, value in (("FLASHSALE_BUYER_TOKEN_SECRET", buyer), ("FLASHSALE_SECRET", own)):
            if not value.replace(",", "").strip():
                raise ConfigError(f"{name} must be set to a secret of at least 16 characters")
            secret_setting(value, name, keys=True)  # also when the settings were not read
        secrets = list(settings.buyer_token_secret.each_key())
        public = load_jwks(settings.buyer_jwks) if settings.buyer_jwks else {}
        return cls(
            BuyerTokens(
                Signer(secrets, "buyer"),
                secrets,
                public,
                settings.buyer_jwt_audience,
                jwks=settings.buyer_jwks,
            ),
            # Every waiting buyer presents the same ticket on each poll: remember verified ones.
            Signer.from_setting(own, "ticket", remember=TICKETS_REMEMBERED),
            Signer.from_setting(own, "admission"),
            Signer.from_setting(own, "challenge"),
        )
