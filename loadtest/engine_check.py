"""What a spike needs of the engine before any buyer is sent: that something answers at the
host, that it takes the admin token (the spike makes its sale and reads its audit through
the admin API), and its buyers' tokens, signed with the buyer-token secret. Each failure is
one line, :class:`CannotStart`, which the CLI prints as its error and the locustfile logs
before it stops the run with exit code 1. Plain ``requests``: the locustfile runs under
gevent, the CLI calls it from a thread."""

from __future__ import annotations

import os
import ssl
import uuid
from typing import Any

import requests

from flashsale.settings import Secret
from flashsale.tokens import Signer

TIMEOUT_S = 30


class CannotStart(Exception):
    """The spike cannot start; ``unreachable`` when nothing answered at the host at all."""

    def __init__(self, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


def call(method: str, host: str, path: str, **kwargs: Any) -> requests.Response:
    """One request of the spike's own (not a buyer's); a failure to get any answer is
    CannotStart naming the host, not requests' chain of exceptions."""
    try:
        return requests.request(method, f"{host}{path}", timeout=TIMEOUT_S, **kwargs)
    except requests.exceptions.SSLError as exc:  # before ConnectionError, which it is too
        raise CannotStart(f"{host}: {_tls_refusal(exc)}") from None
    except requests.ConnectionError:
        raise CannotStart(f"nothing answers at {host}", unreachable=True) from None
    except requests.Timeout:
        raise CannotStart(f"{host} did not answer within {TIMEOUT_S} s") from None
    except requests.RequestException as exc:  # a URL requests cannot use, a bad answer
        raise CannotStart(f"{host}: {exc}") from None


def _tls_refusal(exc: BaseException) -> str:
    """Why a TLS handshake failed: the certificate's fault in words (requests keeps it under
    urllib3's errors), else the error as it was."""
    seen: list[BaseException] = [exc]
    for _ in range(20):  # a short chain of wrapped errors
        if not seen:
            break
        error = seen.pop()
        if isinstance(error, ssl.SSLCertVerificationError):
            return (
                f"its certificate is not trusted: {error.verify_message}; the spike's own "
                "calls trust certifi's CAs, or those of the bundle REQUESTS_CA_BUNDLE names"
            )
        seen += [e for e in (*error.args, getattr(error, "reason", None), error.__cause__)
                 if isinstance(e, BaseException)]  # fmt: skip
    return f"TLS failed: {exc}"


def error_of(answer: Any) -> dict[str, Any]:
    """An error answer's ``{"code", "message", ...}`` (``holds_pending``, ``field``, ... as it
    carries them); empty for one that carries none."""
    try:
        error = answer.json()["error"]
        return {**error, "code": str(error["code"]), "message": str(error["message"])}
    except (ValueError, KeyError, TypeError):
        return {}


def admin_token() -> str:
    """The admin token to send: the first of a rotation's (as the engine's own tools)."""
    return Secret(os.environ.get("FLASHSALE_ADMIN_TOKEN", "")).current()


def admin_headers(token: str) -> dict[str, str]:
    if not token:
        raise CannotStart("FLASHSALE_ADMIN_TOKEN is not set: the spike needs the admin API")
    return {"Authorization": f"Bearer {token}"}


def check_engine(host: str, admin_token: str) -> None:
    """Raises CannotStart unless an engine answers at ``host`` and takes ``admin_token``."""
    answer = call("GET", host, "/admin/v1/sales", params={"limit": "1"},
                  headers=admin_headers(admin_token))  # fmt: skip
    if answer.status_code == 401:
        raise CannotStart(f"the engine at {host} refuses FLASHSALE_ADMIN_TOKEN (401)")
    if answer.status_code == 404:
        raise CannotStart(f"{host} is not the engine's gateway: GET /admin/v1/sales answered 404")


NO_SECRET = "FLASHSALE_BUYER_TOKEN_SECRET is not set: buyers need signed tokens"  # noqa: S105


def mint_buyers(count: int) -> list[str]:
    """``count`` buyer tokens of new buyers, signed as a storefront signs them (2 h)."""
    secret = os.environ.get("FLASHSALE_BUYER_TOKEN_SECRET", "")
    if not secret:
        raise CannotStart(NO_SECRET)
    signer = Signer.from_setting(secret, "buyer")
    run = uuid.uuid4().hex[:8]
    return [signer.sign({"sub": f"spike-{run}-{i}"}, 7200) for i in range(count)]
