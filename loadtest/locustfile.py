"""Spike tests for SREs: locust buyers taking the real journey, and a verdict on correctness.

Run against a running engine (``flashsale up``) with the admin token and the buyer-token
secret in the environment (``FLASHSALE_ADMIN_TOKEN``, ``FLASHSALE_BUYER_TOKEN_SECRET``)::

    locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8080 \\
        --buyers 5000 --stock 100 --ramp 10 --hold 5 --csv spike --html spike.html

or distributed (the master creates the sale and tells its workers)::

    locust -f loadtest/locustfile.py --master --headless --expect-workers 2 \\
        --host http://ENGINE:8080 --buyers 50000 --stock 100 --ramp 10
    locust -f loadtest/locustfile.py --worker --master-host MASTER     # on each load machine

* **test_start** (master or local run): checks that the engine answers at ``--host`` and
  takes the admin token, makes and preloads a sale through the admin API (``--sale ID``
  rehearses that one itself, in place; ``flashsale loadtest spike`` gives it a copy), and
  tells the workers the sale. Every process mints its buyers' tokens with the buyer-token
  secret, as a storefront would. A run that cannot start logs one line (``the spike cannot
  start: …``) and stops with exit code 1.
* **Buyer** (``FastHttpUser``): joins (solving the sale's proof of work when it asks one),
  polls at the server's ``retry_after_ms``, reserves once admitted (at the answer's
  ``reserve_url`` when it names the reservations listener) one of the sale's products, another
  in the same turn if that one sold out (up to three; those sold out *for now*, while units
  other buyers hold may come back, are tried again each second until the turn ends, as the
  page offers), follows the order to a final state, and stops: one journey per buyer. Each
  definitive answer (``reserved``, or ``sold_out`` for good or for the whole turn) is
  recorded as a request of type ``ANSWER`` whose time is the seconds since the sale opened,
  so the ``ANSWER`` rows' maximum (in the stats, the CSV and the HTML report, aggregated over
  workers) is the time until every buyer had an answer.
* **SpikeShape**: ramps from 0 to ``--buyers`` in ``--ramp`` seconds, holds ``--hold`` more,
  then lets the last buyers finish (at most ``--drain`` seconds) and stops.
* **test_stop** (master or local run): waits for the pipeline to drain, runs the post-sale
  audit, prints sold against stock, the oversold units (must be 0) and the seconds until every
  buyer had an answer, and sets a non-zero exit code on any failed invariant.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import threading
import time
import uuid
from typing import Any, ClassVar

import gevent  # type: ignore[import-untyped]
import requests
from locust import FastHttpUser, LoadTestShape, events, task
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

from flashsale.proof_of_work import solution
from loadtest.engine_check import (
    NO_SECRET,
    CannotStart,
    admin_headers,
    admin_token,
    check_engine,
    error_of,
    mint_buyers,
)
from loadtest.spike_sale import SKU, existing_sale, make_sale
from loadtest.verdict import Verdict, judge

log = logging.getLogger("flashsale.locust")
# A spike ramps past locust's comfort line of 100 users a second on purpose: its warning about
# that ("Do you really need to ramp up that fast?") read as a fault of the run.
logging.getLogger("locust.runners").addFilter(
    lambda record: "spawn rate is very high" not in record.getMessage()
)

PICKS = 3  # the products a buyer tries in one turn, each after the last sold out
FOR_NOW = "for now"  # a product sold out while units others hold may come back (no id has a space)
AGAIN_S = 1.0  # how long after a buyer tries again those sold out for now, while the turn lasts
CHALLENGED = frozenset(
    {"challenge_required", "challenge_invalid", "challenge_expired", "challenge_used"}
)
TERMINAL = {"CONFIRMED", "PAYMENT_FAILED", "EXPIRED", "CANCELLED"}
WAITED = "WAITED"  # the stats rows of the 429 and 503 answers waited out, by status


class Spike:
    """What this process knows about the run: the sale, the clock, the buyers' tokens."""

    sale_id: str | None = None
    opened_at: float = 0.0  # time.time() when the sale opened (or opens)
    skus: ClassVar[list[str]] = [SKU]
    challenge = 0  # the proof of work the sale asked at the start, in bits
    tokens: ClassVar[list[str]] = []
    lock = threading.Lock()
    started_at: float = 0.0


@events.init_command_line_parser.add_listener  # type: ignore[untyped-decorator]
def _options(parser: Any) -> None:
    group = parser.add_argument_group("flashsale spike")
    group.add_argument("--buyers", type=int, default=1000, env_var="FLASHSALE_SPIKE_BUYERS",
                       help="buyers in the spike (default 1000)")  # fmt: skip
    group.add_argument("--stock", type=int, default=100, env_var="FLASHSALE_SPIKE_STOCK",
                       help="units of the spike's SKU (default 100)")  # fmt: skip
    group.add_argument("--buckets", type=int, default=1, env_var="FLASHSALE_SPIKE_BUCKETS",
                       help="stock buckets of the spike's SKU (default 1)")  # fmt: skip
    group.add_argument("--ramp", type=float, default=10.0, env_var="FLASHSALE_SPIKE_RAMP",
                       help="seconds to bring every buyer in (default 10)")  # fmt: skip
    group.add_argument("--hold", type=float, default=5.0, env_var="FLASHSALE_SPIKE_HOLD",
                       help="seconds to hold after the ramp (default 5)")  # fmt: skip
    group.add_argument("--drain", type=float, default=120.0, env_var="FLASHSALE_SPIKE_DRAIN",
                       help="most seconds to wait for the last buyers (default 120)")  # fmt: skip
    group.add_argument("--sale", default="", env_var="FLASHSALE_SPIKE_SALE",
                       help="rehearse this preloaded sale itself, its buyers and orders "
                            "staying in it (opening at most 15 min away) instead of making "
                            "one; --stock and --buckets are then the sale's own")  # fmt: skip


def opts(environment: Environment) -> Any:
    """The run's command-line options (locust parses them before any event fires)."""
    assert environment.parsed_options is not None
    return environment.parsed_options


NO_HOST = "--host is not given: the engine's gateway, e.g. http://127.0.0.1:8080"


def _host(environment: Environment) -> str:
    if not environment.host:
        raise CannotStart(NO_HOST)
    return environment.host


def _set_sale(data: dict[str, Any]) -> None:
    Spike.sale_id, Spike.opened_at = data["sale_id"], data["opened_at"]
    Spike.skus, Spike.challenge = list(data["skus"]), int(data["challenge"])


@events.init.add_listener  # type: ignore[untyped-decorator]
def _on_init(environment: Environment, **_kwargs: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        environment.runner.register_message("flashsale_sale", lambda msg, **_k: _set_sale(msg.data))
    # Here, before the shape starts: test_start comes with the first buyers' spawn, and each
    # of them would fail (in locust's own code without a host, minting without the secret)
    # after the master had made a sale nobody could buy from.
    headless = getattr(environment.parsed_options, "headless", False)
    missing = [
        *([NO_HOST] if headless and not environment.host
          and not isinstance(environment.runner, WorkerRunner) else []),
        *([NO_SECRET] if not os.environ.get("FLASHSALE_BUYER_TOKEN_SECRET")
          and not isinstance(environment.runner, MasterRunner) else []),
    ]  # fmt: skip
    if missing:
        log.error("the spike cannot start: %s", "; ".join(missing))
        sys.exit(1)


@events.test_start.add_listener  # type: ignore[untyped-decorator]
def _on_test_start(environment: Environment, **_kwargs: Any) -> None:
    try:
        _start(environment)
    except Exception as exc:  # exit 1 at once, not a wait for buyers who never come
        if isinstance(exc, CannotStart):  # one line
            log.error("the spike cannot start: %s", exc)
        else:  # an answer it did not expect: with where it failed
            log.exception("the spike cannot start: %r", exc)
        environment.process_exit_code = 1
        assert environment.runner is not None
        gevent.spawn(environment.runner.quit)  # not from inside the runner's own start


def _start(environment: Environment) -> None:
    options = opts(environment)
    Spike.started_at = time.time()
    if not isinstance(environment.runner, WorkerRunner):
        host, token = _host(environment), admin_token()
        check_engine(host, token)
        sale = (existing_sale(host, token, options.sale) if options.sale else
                make_sale(host, token, options.buyers, options.stock, options.buckets))  # fmt: skip
        _set_sale(sale)
        log.info("spike on sale %s: %d buyers, %d units", sale["sale_id"], options.buyers,
                 sale["units"])  # fmt: skip
        if isinstance(environment.runner, MasterRunner):
            environment.runner.send_message("flashsale_sale", sale)
    if not isinstance(environment.runner, MasterRunner):
        Spike.tokens = mint_buyers(options.buyers)  # a worker mints enough for any share it gets


class Buyer(FastHttpUser):
    """One buyer, one journey, one definitive answer."""

    def wait_time(self) -> float:
        return 0.0

    done = False  # after its journey a buyer idles, so the runner never spawns a replacement

    def on_start(self) -> None:
        with Spike.lock:
            self.token = Spike.tokens.pop() if Spike.tokens else mint_buyers(1)[0]
        self.auth: dict[str, str] = {"Authorization": f"Bearer {self.token}"}

    def _answer(self, outcome: str) -> None:
        """A definitive answer, timed from the sale's opening (the spike's verdict)."""
        self.environment.events.request.fire(
            request_type="ANSWER", name=outcome, response_length=0, exception=None,
            response_time=(time.time() - Spike.opened_at) * 1000, context={},
        )  # fmt: skip

    @task
    def journey(self) -> None:
        if self.done:
            time.sleep(1.0)
            return
        self.done = True
        while Spike.sale_id is None:  # a worker waits for the master's sale
            time.sleep(0.05)
        sale = Spike.sale_id
        joined = self._join(sale)
        if joined is None:
            return
        body = joined
        ticket = str(body.get("ticket"))
        # A join can already be admitted; the admission token comes with a status answer.
        while body.get("state") == "waiting" or (
            body.get("state") == "admitted" and "admission_token" not in body
        ):
            if body.get("state") == "waiting":
                time.sleep(body.get("retry_after_ms", 250) / 1000)  # as the server asks
            polled = self._json("GET", f"/v1/sales/{sale}/queue/status", "status",
                                headers={"X-Queue-Ticket": ticket})  # fmt: skip
            if polled is None:
                return
            body = polled
            ticket = str(body.get("ticket", ticket))
        if body.get("state") != "admitted":
            self._answer("sold_out" if body.get("state") == "sold_out" else "other")
            return
        # Where the admitted answer says (the reservations listener), else this gateway.
        url = body.get("reserve_url") or f"/v1/sales/{sale}/reservations"
        admission = str(body["admission_token"])
        turn_ends = time.time() + body.get("admission_expires_in_ms", 0) / 1000
        picks = random.sample(Spike.skus, min(PICKS, len(Spike.skus)))
        while picks:
            later = []
            for sku in picks:
                reservation = self._reserve(url, sku, admission)
                if reservation is None:  # a failure, recorded
                    return
                if reservation == FOR_NOW:
                    later.append(sku)
                elif reservation:
                    self._answer("reserved")
                    self._follow(reservation)
                    return
            # Those sold out for now are tried again while the turn lasts, as the page offers.
            if time.time() + AGAIN_S + 0.5 > turn_ends:
                break
            picks = later
            if picks:
                time.sleep(AGAIN_S)
        self._answer("sold_out")  # each product tried was, for good or for the whole turn

    def _join(self, sale: str) -> dict[str, Any] | None:
        """Join, with the sale's proof of work solved when it asks one (at the start, or since:
        a refusal says so, and a new challenge is solved, as the page does, up to three
        times); None after a failure, recorded."""
        solving = Spike.challenge > 0
        for _ in range(4):
            headers = self._solved(sale) if solving else self.auth
            if headers is None:
                return None
            joined = self._json("POST", f"/v1/sales/{sale}/queue", "join", headers, CHALLENGED)
            if joined is None or "refused" not in joined:
                return joined
            solving = True
        return None

    def _solved(self, sale: str) -> dict[str, str] | None:
        """The buyer's join headers with a challenge solved, as a browser's page sends them."""
        offer = self._json("GET", f"/v1/sales/{sale}/queue/challenge", "challenge")
        if offer is None:
            return None
        if not offer.get("challenge"):  # the sale asks none (any more)
            return self.auth
        challenge = str(offer["challenge"])
        return {**self.auth, "X-Challenge": challenge,
                "X-Challenge-Solution": solution(challenge, int(offer["difficulty"]))}  # fmt: skip

    def _reserve(self, url: str, sku: str, admission: str) -> str | None:
        """One product reserved: its reservation id, "" when it sold out, FOR_NOW when for now
        (units others hold may come back; the admission stays the buyer's either way), None
        after a failure, recorded."""
        payment = "tok_decline" if random.random() < 0.1 else "tok_visa"  # noqa: S311
        # One key for every try: a retry after an answer that was lost gets that answer.
        headers = {**self.auth, "X-Admission-Token": admission,
                   "Idempotency-Key": uuid.uuid4().hex}  # fmt: skip
        while True:
            with self.client.post(
                url, name="reserve", catch_response=True, headers=headers,
                json={"sku": sku, "quantity": 1, "payment_token": payment},
            ) as response:  # fmt: skip
                if self._backed_off(response):
                    continue
                if response.status_code == 201:
                    response.success()
                    return str(response.json()["reservation_id"])
                refused = error_of(response) if response.status_code == 409 else {}
                if refused.get("code") == "sold_out":
                    response.success()
                    return FOR_NOW if refused.get("holds_pending") else ""
                response.failure(f"reserve answered {response.status_code}: {response.text}")
                return None

    def _backed_off(self, response: Any) -> bool:
        """Whether ``response`` is backpressure (429, 503), as designed: counted as a success
        (and in a ``WAITED`` row of its status, for the verdict), waited out at its Retry-After
        (at most 5 s), to be sent again, as the page does."""
        if response.status_code not in (429, 503):
            return False
        response.success()
        self.environment.events.request.fire(
            request_type=WAITED, name=str(response.status_code), response_length=0,
            exception=None, response_time=0, context={},
        )  # fmt: skip
        time.sleep(min(5.0, float(response.headers.get("Retry-After") or 1)))
        return True

    def _follow(self, reservation: str) -> None:
        """Poll the reservation until its order is final (the saga finished)."""
        deadline = time.time() + 60
        while time.time() < deadline:
            body = self._json("GET", f"/v1/reservations/{reservation}", "reservation")
            order = (body or {}).get("order") or {}
            if order.get("state") in TERMINAL:
                return
            time.sleep(0.5)

    def _json(self, method: str, path: str, name: str, headers: dict[str, str] | None = None,
              expected: frozenset[str] = frozenset()) -> dict[str, Any] | None:  # fmt: skip
        """One call, retried after 429/503 as the server asks; ``{"refused": code}`` for a
        403 with one of the ``expected`` codes; None on another failure."""
        while True:
            with self.client.request(method, path, name=name, catch_response=True,
                                     headers=headers or self.auth) as response:  # fmt: skip
                if self._backed_off(response):
                    continue
                code = error_of(response).get("code", "") if response.status_code == 403 else ""
                if code in expected:
                    response.success()
                    return {"refused": code}
                if response.status_code != 200:
                    response.failure(f"{name} answered {response.status_code}: {response.text}")
                    return None
                response.success()
                return dict(response.json())


class SpikeShape(LoadTestShape):
    """0 -> ``--buyers`` in ``--ramp`` seconds, hold ``--hold`` seconds, then stop once every
    buyer has a definitive answer (the ``ANSWER`` rows, summed over workers), at most
    ``--drain`` seconds more."""

    def tick(self) -> tuple[int, float] | None:
        runner = self.runner
        assert runner is not None
        options = opts(runner.environment)
        elapsed = self.get_run_time()  # type: ignore[no-untyped-call]
        buyers, ramp = options.buyers, max(0.1, options.ramp)
        if elapsed < ramp + options.hold:
            return buyers, buyers / ramp
        answered = sum(e.num_requests for (_, kind), e in runner.stats.entries.items()
                       if kind == "ANSWER")  # fmt: skip
        # A sale that opens later: its buyers wait in the pre-queue until then.
        opens_in = max(0.0, Spike.opened_at - time.time())
        if answered < buyers and elapsed < ramp + options.hold + options.drain + opens_in:
            return buyers, buyers / ramp
        return None


@events.test_stop.add_listener  # type: ignore[untyped-decorator]
def _on_test_stop(environment: Environment, **_kwargs: Any) -> None:
    if isinstance(environment.runner, WorkerRunner) or Spike.sale_id is None:
        return
    verdict = _verdict(environment, Spike.sale_id)
    for line in verdict.lines:
        print(line, flush=True)  # the run's verdict, on stdout beside locust's stats
    if not verdict.ok:
        environment.process_exit_code = 1


def _verdict(environment: Environment, sale_id: str) -> Verdict:
    """Drain, audit, and judge the run (:func:`loadtest.verdict.judge`)."""
    host, options, admin = environment.host, opts(environment), admin_headers(admin_token())
    deadline = time.time() + 120
    while True:  # the audit needs the pipeline drained; until then it says so
        response = requests.get(f"{host}/admin/v1/sales/{sale_id}/audit",
                                headers=admin, timeout=60)  # fmt: skip
        audit = response.json() if response.status_code == 200 else {}
        if audit.get("passed") or audit.get("facts", {}).get("drained") or time.time() > deadline:
            break
        time.sleep(1)
    status = requests.get(f"{host}/admin/v1/sales/{sale_id}", headers=admin,
                          timeout=30).json()  # fmt: skip
    skus = status.get("skus", [])
    answers = [e for (_, kind), e in environment.stats.entries.items() if kind == "ANSWER"]
    waited = {int(name): e.num_requests for (name, kind), e in environment.stats.entries.items()
              if kind == WAITED}  # fmt: skip
    return judge(
        sale_id,
        audit,
        sum(sku["confirmed"] for sku in skus),
        sum(sku["stock_total"] for sku in skus),
        answered=sum(e.num_requests for e in answers),
        buyers=options.buyers,
        slowest_s=max((e.max_response_time for e in answers), default=0) / 1000,
        waited=waited,
    )
