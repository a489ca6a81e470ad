"""``flashsale psp``: a payment-provider simulator with Stripe-like idempotency.

* ``POST /v1/charges`` with ``Idempotency-Key`` and ``{"amount", "currency", "token"}``:
  authorize and capture. The same key returns the same charge; the same key with other
  parameters is 409 ``idempotency_mismatch``.
* ``POST /v1/charges/batch`` with ``{"charges": [{"idempotency_key", ...}, ...]}``: many
  charges in one request, each decided as its own call (results in order; an item that fails
  carries ``{"error"}``). One round trip and one latency for the lot.
* ``GET /v1/charges/{key}``: the charge made under a key (404 if none).
* ``GET /v1/charges?prefix=P&starting_after=K&limit=N``: charges whose key starts with ``P``,
  in the order they were made, after the one made under ``K`` (a cursor, as Stripe lists):
  ``{"data": [...], "has_more": bool}``. The reconciler finds captures with no order this way.
* ``POST /v1/charges/{key}/refund``: refund a capture (idempotent).
* ``GET /v1/stats``: captures, declines, refunds, and how many times each key was captured
  (``max_captures_per_key`` must stay 1).
* ``GET /v1/knobs`` and ``PUT /v1/knobs`` with some of ``{"latency_ms", "jitter_ms",
  "decline_rate", "error_rate", "timeout_rate", "hang_s"}``: read or change the knobs while it
  runs (a storm of 500s, slow answers), as ``flashsale chaos`` does.

Outcomes are deterministic: the payment token decides the test cases, and random knobs draw
from a generator seeded by the idempotency key, so a rerun behaves the same.

* ``tok_decline…``: always declined (``card_declined``);
* ``tok_timeout…``: the first call under a key captures, then answers too late (a timeout
  after success);
* ``tok_error…``: the first call under a key fails with 500 before charging;
* anything else: captured, subject to the knobs below.

Knobs (``flashsale psp --help``): latency mean and jitter, decline rate, 5xx rate,
timeout-after-success rate. Charges live in memory and, with a journal (``--journal PATH``, as
``flashsale up`` runs it), are appended to it as JSON lines and read back at start: a real
provider does not forget a capture because it restarted, and neither does the simulator. It
forgets charges older than ``--keep-days`` (7) at start, as a provider forgets idempotency
keys (``workers/psp_journal.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import itertools
import random
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter

from flashsale.ops_endpoints import PROBES, Readiness, listen, ops_app
from workers.psp_journal import KEEP_DAYS, Journal, Loaded, load


@dataclass(frozen=True)
class Knobs:
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    decline_rate: float = 0.0
    error_rate: float = 0.0
    timeout_rate: float = 0.0
    hang_s: float = 30.0  # how late a "timeout after success" answers
    seed: int = 0

    def __str__(self) -> str:
        """The knobs as a person reads them (the simulator's start line)."""
        return (f"latency {self.latency_ms:g} ms ± {self.jitter_ms:g} ms, "
                f"{self.decline_rate:.0%} declined, {self.error_rate:.0%} failing with 5xx, "
                f"{self.timeout_rate:.0%} answered after a timeout ({self.hang_s:g} s late), "
                f"seed {self.seed}")  # fmt: skip

    def changed(self, body: Any) -> Knobs:
        """These knobs with the ones ``body`` names changed; ValueError names a bad one."""
        if not isinstance(body, dict) or not body:
            raise ValueError("a JSON object of knobs to change is required")
        names = {f.name for f in dataclasses.fields(self)} - {"seed"}
        values: dict[str, float] = {}
        for name, value in body.items():
            if name not in names:
                raise ValueError(f"{name}: not a knob (one of {', '.join(sorted(names))})")
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{name}: must be a number >= 0")
            if name.endswith("_rate") and value > 1:
                raise ValueError(f"{name}: must be between 0 and 1")
            values[name] = float(value)
        return dataclasses.replace(self, **values)  # type: ignore[arg-type]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


SERVES = (
    "this payment simulator serves /v1/charges (POST a charge; GET lists them), "
    "/v1/charges/batch, /v1/charges/{key} (GET), /v1/charges/{key}/refund (POST), /v1/stats, "
    f"/v1/knobs (GET, PUT) and {PROBES}"
)


def _problem(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def _error(status: int, code: str, message: str) -> web.Response:
    return _json(_problem(code, message), status)


def _params(key: str, body: Any) -> tuple[int, str, str]:
    """(amount, currency, token) of a charge request; ValueError names what is wrong."""
    if not key or len(key) > 255:
        raise ValueError("an idempotency key of 1..255 characters is required")
    amount, currency, token = int(body["amount"]), str(body["currency"]), str(body["token"])
    if amount < 0:
        raise ValueError("amount must be >= 0")
    return amount, currency, token


class Simulator:
    def __init__(self, knobs: Knobs, registry: CollectorRegistry | None = None,
                 journal: Path | None = None, keep_days: float = KEEP_DAYS) -> None:  # fmt: skip
        self.knobs = knobs
        self.charges: dict[str, dict[str, Any]] = {}
        self.made: list[str] = []  # keys in the order their charges were made (for listing)
        self.position: dict[str, int] = {}
        # Positions in `made` by the key's text before its first "~" (the engine's keys are
        # "<sale>~<sku>~r-..."), so listing a sale's charges reads only that sale's.
        self.groups: dict[str, list[int]] = {}
        self.params: dict[str, tuple[int, str, str]] = {}
        self.calls: Counter[str] = Counter()  # charge calls per key
        self.captures: Counter[str] = Counter()  # captures per key (must stay <= 1)
        self.refunds = 0
        self._ids = itertools.count(1)
        self.registry = registry or CollectorRegistry()
        self._jitter = random.Random(knobs.seed)  # noqa: S311 - a simulation
        self.outcomes = PromCounter("flashsale_psp_charges", "Charge calls by outcome",
                                    ["outcome"], registry=self.registry)  # fmt: skip
        self._journal: Journal | None = None
        if journal is not None:
            self._replay(load(journal, keep_days))
            self._journal = Journal(journal)

    def _replay(self, loaded: Loaded) -> None:
        """The charges an earlier run made and the journal still keeps."""
        for key, entry in loaded.entries.items():
            self._made(key)
            self.params[key] = entry.params
            self.charges[key] = entry.charge
            if entry.charge["status"] != "declined":
                self.captures[key] = 1
            if entry.charge["status"] == "refunded":
                self.refunds += 1
        self._ids = itertools.count(loaded.next_id)

    def _record(self, key: str, charge: dict[str, Any]) -> None:
        if self._journal is not None:
            self._journal.append(key, self.params[key], charge)

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()

    def _draw(self, key: str, attempt: int) -> Callable[[float], bool]:
        """``chance(rate)`` for one call: True with probability ``rate``, drawn from a
        generator seeded by the key and attempt (made only once a knob needs it: seeding
        costs more than the rest of a charge)."""
        rng: random.Random | None = None

        def chance(rate: float) -> bool:
            nonlocal rng
            if rate <= 0:
                return False
            if rng is None:
                digest = hashlib.sha256(f"{self.knobs.seed}:{key}:{attempt}".encode()).digest()
                rng = random.Random(int.from_bytes(digest[:8], "big"))  # noqa: S311 - a simulation
            return rng.random() < rate

        return chance

    def _decide(self, key: str, params: tuple[int, str, str]) -> tuple[int, Any, bool]:
        """(HTTP status, body, answer late?) for one charge call under ``key``."""
        self.calls[key] += 1
        attempt = self.calls[key]
        chance = self._draw(key, attempt)
        known = self.charges.get(key)
        if known is not None:
            if self.params[key] != params:
                self.outcomes.labels("idempotency_mismatch").inc()
                return 409, _problem("idempotency_mismatch", "key reused with other parameters"), \
                    False  # fmt: skip
            self.outcomes.labels("replayed").inc()
            return 200, known, False
        amount, currency, token = params
        first = attempt == 1
        if (token.startswith("tok_error") and first) or chance(self.knobs.error_rate):
            self.outcomes.labels("error").inc()
            return 500, _problem("provider_error", "simulated failure before charging"), False
        declined = token.startswith("tok_decline") or chance(self.knobs.decline_rate)
        charge = {
            "id": f"ch_{next(self._ids):08d}", "idempotency_key": key, "amount": amount,
            "currency": currency, "status": "declined" if declined else "captured",
        }  # fmt: skip
        if declined:
            charge["decline_code"] = "card_declined"
        else:
            self.captures[key] += 1
        self.charges[key] = charge
        self.params[key] = params
        self._made(key)
        self._record(key, charge)
        self.outcomes.labels(charge["status"]).inc()
        late = (token.startswith("tok_timeout") and first) or chance(self.knobs.timeout_rate)
        if late:
            self.outcomes.labels("timeout_after_success").inc()
        return 200, charge, late

    async def _latency(self) -> None:
        k = self.knobs
        delay = max(0.0, self._jitter.gauss(k.latency_ms, k.jitter_ms)) if k.jitter_ms \
            else k.latency_ms  # fmt: skip
        if delay > 0:
            await asyncio.sleep(delay / 1000)

    async def charge(self, request: web.Request) -> web.StreamResponse:
        key = request.headers.get("Idempotency-Key", "")
        try:
            params = _params(key, orjson.loads(await request.read()))
        except (ValueError, KeyError, TypeError, orjson.JSONDecodeError) as exc:
            return _json(_problem("invalid_request", str(exc)), 400)
        await self._latency()
        status, body, late = self._decide(key, params)
        if late:
            await asyncio.sleep(self.knobs.hang_s)  # the client has given up by now
        return _json(body, status)

    async def charge_batch(self, request: web.Request) -> web.StreamResponse:
        """``{"charges": [{"idempotency_key", "amount", "currency", "token"}, ...]}`` ->
        ``{"results": [charge or {"error"}, ...]}``: each item as its own charge call, one
        latency for the whole request. Answers late if any item does."""
        try:
            items = orjson.loads(await request.read())["charges"]
            calls = [(str(i["idempotency_key"]), _params(str(i["idempotency_key"]), i))
                     for i in items]  # fmt: skip
        except (ValueError, KeyError, TypeError, orjson.JSONDecodeError) as exc:
            return _json(_problem("invalid_request", str(exc)), 400)
        await self._latency()
        results, late = [], False
        for key, params in calls:
            _status, body, item_late = self._decide(key, params)
            results.append(body)
            late = late or item_late
        if late:
            await asyncio.sleep(self.knobs.hang_s)
        return _json({"results": results})

    async def lookup(self, request: web.Request) -> web.Response:
        charge = self.charges.get(request.match_info["key"])
        if charge is None:
            return _error(404, "not_found", "no charge under this key")
        return _json(charge)

    def _made(self, key: str) -> None:
        position = len(self.made)
        self.position[key] = position
        self.made.append(key)
        self.groups.setdefault(key.partition("~")[0], []).append(position)

    async def list_charges(self, request: web.Request) -> web.Response:
        prefix = request.query.get("prefix", "")
        after = request.query.get("starting_after")
        try:
            limit = min(1000, max(1, int(request.query.get("limit", "100"))))
        except ValueError:
            return _error(400, "invalid_request", "limit must be an integer")
        if after is not None and after not in self.position:
            return _error(400, "invalid_request", "starting_after names no charge")
        start = 0 if after is None else self.position[after] + 1
        # A prefix with a "~" can only match keys of its group; any other reads every key.
        group, tilde, _ = prefix.partition("~")
        positions: Sequence[int] = self.groups.get(group, []) if tilde else range(len(self.made))
        data: list[dict[str, Any]] = []
        more = False
        for position in itertools.islice(positions, bisect_left(positions, start), None):
            key = self.made[position]
            if not key.startswith(prefix):
                continue
            if len(data) == limit:
                more = True
                break
            data.append(self.charges[key])
        return _json({"data": data, "has_more": more})

    async def refund(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        charge = self.charges.get(key)
        if charge is None:
            return _error(404, "not_found", "no charge under this key")
        if charge["status"] == "declined":
            return _error(409, "not_captured", "a declined charge cannot be refunded")
        if charge["status"] == "captured":
            charge["status"] = "refunded"
            self._record(key, charge)
            self.refunds += 1
            self.outcomes.labels("refunded").inc()
        return _json(charge)

    async def stats(self, _request: web.Request) -> web.Response:
        statuses = Counter(c["status"] for c in self.charges.values())
        return _json({
            "charges": len(self.charges), "captured": statuses["captured"],
            "declined": statuses["declined"], "refunded": statuses["refunded"],
            "calls": sum(self.calls.values()),
            "max_captures_per_key": max(self.captures.values(), default=0),
        })  # fmt: skip

    async def get_knobs(self, _request: web.Request) -> web.Response:
        return _json(dataclasses.asdict(self.knobs))

    async def put_knobs(self, request: web.Request) -> web.Response:
        try:
            self.knobs = self.knobs.changed(orjson.loads(await request.read()))
        except (ValueError, orjson.JSONDecodeError) as exc:
            return _json(_problem("invalid_request", str(exc)), 400)
        return _json(dataclasses.asdict(self.knobs))

    def app(self) -> web.Application:
        app = ops_app(Readiness({}), self.registry, SERVES)
        app.router.add_post("/v1/charges", self.charge)
        app.router.add_post("/v1/charges/batch", self.charge_batch)
        app.router.add_get("/v1/charges", self.list_charges)
        app.router.add_get("/v1/charges/{key}", self.lookup)
        app.router.add_post("/v1/charges/{key}/refund", self.refund)
        app.router.add_get("/v1/stats", self.stats)
        app.router.add_get("/v1/knobs", self.get_knobs)
        app.router.add_put("/v1/knobs", self.put_knobs)
        return app


async def serve(host: str, port: int, knobs: Knobs, stop: asyncio.Event,
                journal: Path | None = None, *, keep_days: float = KEEP_DAYS,
                listening: Callable[[], None] = lambda: None) -> None:  # fmt: skip
    """Serve until ``stop``; ``listening`` is called once the port is taken."""
    simulator = Simulator(knobs, journal=journal, keep_days=keep_days)
    runner = web.AppRunner(simulator.app(), access_log=None, shutdown_timeout=1)
    await runner.setup()
    try:
        await listen(runner, host, port, backlog=4096)
        listening()
        await stop.wait()
    finally:
        await runner.cleanup()
        simulator.close()
