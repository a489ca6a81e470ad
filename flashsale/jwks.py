"""A storefront's public keys for its buyer tokens (``FLASHSALE_BUYER_JWKS``): a JWKS file or
http(s) URL read into the keys that verify ES256 and RS256 JWTs, each by its ``kid``; the keys an
identity provider publishes for other uses left out and said."""

from __future__ import annotations

import codecs
import logging
from typing import Any

import orjson

from flashsale.errors import ConfigError
from flashsale.outages import untrusted_certificate

log = logging.getLogger("flashsale.tokens")
JWKS_ALGORITHMS = ("ES256", "RS256")


def load_jwks(source: str) -> dict[str, Any]:
    """The public keys (kid -> PyJWK) of a JWKS file path or http(s) URL; ConfigError names
    what is wrong."""
    import urllib.request  # noqa: PLC0415

    try:
        if source.startswith(("https://", "http://")):
            with urllib.request.urlopen(source, timeout=10) as response:  # noqa: S310 - configured
                raw = response.read()
        else:
            with open(source, "rb") as handle:
                raw = handle.read()
        entries = orjson.loads(raw.removeprefix(codecs.BOM_UTF8)).get("keys")
    except (OSError, ValueError, AttributeError) as exc:
        said = untrusted_certificate(exc) or exc  # a storefront's own CA: what is trusted
        raise ConfigError(f"FLASHSALE_BUYER_JWKS: cannot load {source}: {said}") from None
    if not isinstance(entries, list):
        raise ConfigError(f'FLASHSALE_BUYER_JWKS: {source} is not a JWKS ({{"keys": [...]}})')
    found: dict[str, Any] = {}
    others: list[str] = []
    for entry in entries:
        key, why = _verifying_key(entry)
        if key is None:
            others.append(why)
        else:
            found[key.key_id] = key
    if not found:
        raise ConfigError(f"FLASHSALE_BUYER_JWKS: {source} has no key for verifying buyer tokens"
                          " (ES256 or RS256, with a kid, not marked for encryption); its keys: "
                          + (", ".join(others) or "none"))  # fmt: skip
    if others:  # an identity provider's keys for other uses, or other algorithms
        log.info("FLASHSALE_BUYER_JWKS: left out %s", ", ".join(others))
    return found


def _verifying_key(entry: Any) -> tuple[Any, str]:
    """A JWKS entry as a key for buyer tokens (``PyJWK``), or None and how it is described.
    Without ``alg`` a key's algorithm follows from its kind (RSA: RS256, EC P-256: ES256)."""
    import jwt  # noqa: PLC0415

    if not isinstance(entry, dict):
        return None, "an entry that is not an object"
    kid, alg, use = entry.get("kid"), entry.get("alg"), entry.get("use")
    key, broken = None, ""
    try:
        key = jwt.PyJWK(entry) if use in (None, "sig") and alg in (None, *JWKS_ALGORITHMS) else None
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        broken = f"not a valid key: {exc}"
    if key is not None and key.algorithm_name in JWKS_ALGORITHMS and isinstance(kid, str) and kid:
        return key, ""
    parts = [str(alg)] if alg else [key.algorithm_name] if key is not None else []
    parts += [f"use {use}"] if use not in (None, "sig") else []
    parts += [broken] if broken else []
    named = kid if isinstance(kid, str) and kid else "a key without a kid"
    kind = ", ".join(parts) or f"kty {entry.get('kty')}"
    return None, f"{named} ({kind})"
