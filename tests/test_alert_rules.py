"""The alert rules that watch a failure no other alert sees, proven with ``promtool test
rules`` on made-up series: each fires on what it is for, and stays quiet otherwise."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tests.test_prometheus import RULES, prometheus  # noqa: F401 - the fixture

RUNBOOK = "https://flashsale.example/docs/RUNBOOK.md#"


def promtool_test(tmp_path: Path, series: list[dict[str, str]],
                  cases: list[dict[str, Any]], interval: str = "1m") -> None:  # fmt: skip
    """``cases``: (time, alert, the alerts expected then), over ``series`` sampled and the
    rules evaluated every ``interval`` from time 0."""
    spec = tmp_path / "rules.test.yml"
    spec.write_text(json.dumps({
        "rule_files": [str(RULES)],
        "evaluation_interval": interval,
        "tests": [{"interval": interval, "input_series": series, "alert_rule_test": cases}],
    }))  # fmt: skip
    result = subprocess.run(["promtool", "test", "rules", str(spec)], capture_output=True,
                            text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def at(when: int | str, alert: str, *fired: dict[str, Any]) -> dict[str, Any]:
    """``when``: a minute, or a duration such as ``"25s"``."""
    eval_time = f"{when}m" if isinstance(when, int) else when
    return {"eval_time": eval_time, "alertname": alert, "exp_alerts": list(fired)}


def firing(severity: str, summary: str, section: str, **labels: str) -> dict[str, Any]:
    """An alert as promtool expects it: its labels, its summary, its runbook section."""
    return {
        "exp_labels": {"severity": severity, **labels},
        "exp_annotations": {"summary": summary, "runbook_url": RUNBOOK + section},
    }


def test_the_dead_letter_alert_fires_on_one_more_parked_message(
    prometheus: str,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    """The gauge is the topic's end offsets: it only grows (a broker that lost its storage
    starts again from 0). One message more fires the alert at once; none more for 15 minutes
    clears it."""
    fired = firing("warning", "1 more message parked on flashsale-dead-letter in 15 minutes: "
                   "`flashsale kafka dead-letters` lists them", "flashsaledeadletters",
                   topic="flashsale-dead-letter")  # fmt: skip
    promtool_test(tmp_path, [{
        "series": 'flashsale_dead_letter_messages{topic="flashsale-dead-letter"}',
        "values": "4 4 4 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5",
    }], [at(2, "FlashsaleDeadLetters"), at(4, "FlashsaleDeadLetters", fired),
         at(20, "FlashsaleDeadLetters")])  # fmt: skip


def test_the_pump_alert_fires_when_its_ticks_keep_failing(
    prometheus: str,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    """A pump whose ticks fail keeps its last ``flashsale_pump_leader`` reading (1), so
    FlashsalePumpWithoutLeader stays quiet while nobody is admitted. A failed tick now and
    then (a Redis blip) is not an alert; a minute of them is."""
    fired = firing("critical", "the admission pump of sale s-1 fails its ticks: nobody is "
                   "admitted", "flashsalepumpfailing", sale="s-1")  # fmt: skip
    promtool_test(tmp_path, [
        {"series": 'flashsale_pump_errors_total{sale="s-1", instance="a"}',
         "values": "0 1 1 1 1 1 61 121 181 241 241 241 241 241 241"},
        {"series": 'flashsale_pump_leader{sale="s-1", instance="a"}', "values": "1x14"},
    ], [at(3, "FlashsalePumpFailing"), at(9, "FlashsalePumpFailing", fired),
        at(9, "FlashsalePumpWithoutLeader"), at(13, "FlashsalePumpFailing")])  # fmt: skip


def test_the_reconciler_alert_fires_when_no_pass_finishes(
    prometheus: str,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    """Passes that fail while others finish (an outage the reconciler rides out) are not an
    alert; ten minutes of failures and no finished pass are: no drift is repaired."""
    fired = firing("warning", "no reconcile pass has finished for 10 minutes: drift is not "
                   "repaired", "flashsalereconcilerstalled", instance="r")  # fmt: skip
    promtool_test(
        tmp_path,
        [
            {
                "series": 'flashsale_reconcile_passes_total{instance="r"}',
                "values": "0+12x10 120x20",
            },
            {
                "series": 'flashsale_reconcile_pass_failures_total{instance="r"}',
                "values": "0+1x10 10+12x20",
            },
        ],
        [at(8, "FlashsaleReconcilerStalled"), at(28, "FlashsaleReconcilerStalled", fired)],
    )


def test_the_reservations_alert_fires_when_their_p99_passes_half_a_second(
    prometheus: str,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    """Admitted buyers' reservations slowed down (a slow Redis, a broker slow to take their
    events) and nothing said so: the gateway's own histogram had it. 60 a minute, all under
    100 ms, then one in ten between 0.5 and 1 s: p99 0.95 s for 5 minutes fires it."""
    route = 'route="/v1/sales/{sale}/reservations"'
    buckets = {"0.1": "0+60x10 600+54x20", "0.5": "0+60x10 600+54x20", "1": "0+60x30",
               "+Inf": "0+60x30"}  # fmt: skip
    series = [{"series": f'flashsale_gateway_request_duration_seconds_bucket{{{route},le="{le}"}}',
               "values": values} for le, values in buckets.items()]  # fmt: skip
    fired = firing("warning", "admitted buyers' reservations take over 500 ms at p99",
                   "flashsalereservationsslow")  # fmt: skip
    promtool_test(tmp_path, series, [at(10, "FlashsaleReservationsSlow"),
                                     at(14, "FlashsaleReservationsSlow"),
                                     at(22, "FlashsaleReservationsSlow", fired)])  # fmt: skip


def test_the_lag_alert_fires_after_15_seconds_of_a_backlog(
    prometheus: str,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    """The rule as shipped: over 100 reservations unconsumed for 15 s fire it, 10 s do not, and
    it clears once the workers catch up (the real Prometheus of test_prometheus sees the lag
    itself, with a shorter wait)."""
    fired = firing("warning", "500 reservations wait for the workers (flashsale-workers)",
                   "flashsaleconsumerlag", topic="flashsale-reservations",
                   group="flashsale-workers")  # fmt: skip
    labels = 'topic="flashsale-reservations", group="flashsale-workers", instance="r"'
    promtool_test(
        tmp_path,
        [{"series": f"flashsale_consumer_lag_messages{{{labels}}}", "values": "0 0 500x5 50x3"}],
        [at("5s", "FlashsaleConsumerLag"), at("20s", "FlashsaleConsumerLag"),
         at("25s", "FlashsaleConsumerLag", fired), at("40s", "FlashsaleConsumerLag")],
        interval="5s",
    )  # fmt: skip


def test_the_skus_not_preloaded_alert_fires_after_5_minutes(
    prometheus: str,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    """Two SKUs imported into an open sale at minute 1 and not preloaded: fired at 6, not
    before; their preload (the series gone) clears it. A preload within 5 minutes says
    nothing."""
    fired = firing("warning", "2 SKUs of sale s-1 were added after its preload and not "
                   "preloaded: no buyer can see or reserve them", "flashsaleskusnotpreloaded",
                   sale="s-1")  # fmt: skip
    promtool_test(tmp_path, [
        {"series": 'flashsale_skus_not_preloaded{sale="s-1", instance="a"}',
         "values": "_ 2x6 stale"},
        {"series": 'flashsale_skus_not_preloaded{sale="s-2", instance="a"}',
         "values": "_ 1x3 stale"},
    ], [at(5, "FlashsaleSkusNotPreloaded"), at(6, "FlashsaleSkusNotPreloaded", fired),
        at(8, "FlashsaleSkusNotPreloaded")])  # fmt: skip


def test_the_webhook_alert_fires_after_5_minutes_of_a_shop_taking_none(
    prometheus: str,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    """The shop answers 2xx until minute 2, then only errors: the rule holds from minute 7
    (no 2xx in its 5-minute window) and fires at 12; a 2xx again at minute 14 clears it."""
    fired = firing("warning", "the storefront has taken no order webhook for 5 minutes: they "
                   "are sent again until it answers 2xx", "flashsalewebhooksfailing",
                   job="flashsale-workers")  # fmt: skip
    name = "flashsale_webhook_request_duration_seconds_count"
    promtool_test(tmp_path, [
        {"series": f'{name}{{job="flashsale-workers", outcome="2xx"}}',
         "values": "0 10 20 20 20 20 20 20 20 20 20 20 20 20 30 40"},
        {"series": f'{name}{{job="flashsale-workers", outcome="5xx"}}',
         "values": "0 0 5 10 15 20 25 30 35 40 45 50 55 60 60 60"},
    ], [at(6, "FlashsaleWebhooksFailing"), at(11, "FlashsaleWebhooksFailing"),
        at(12, "FlashsaleWebhooksFailing", fired), at(14, "FlashsaleWebhooksFailing")])  # fmt: skip


def test_the_webhook_backlog_alert_fires_after_10_minutes_of_a_shop_behind(
    prometheus: str,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    """Over 1,000 events behind from minute 2: fired at 12, not before; once the shop
    catches up (800, then 0) it clears. A backlog that never passes 1,000 stays quiet."""
    fired = firing("warning", "1500 order events wait for the storefront (flashsale-webhooks): "
                   "it takes them slower than they come", "flashsalewebhookbacklog",
                   group="flashsale-webhooks")  # fmt: skip
    name = "flashsale_webhook_lag_messages"
    promtool_test(tmp_path, [
        {"series": f'{name}{{group="flashsale-webhooks", instance="reconciler"}}',
         "values": "0 200 1500x12 800 0"},
        {"series": f'{name}{{group="other", instance="reconciler"}}', "values": "900x16"},
    ], [at(11, "FlashsaleWebhookBacklog"), at(12, "FlashsaleWebhookBacklog", fired),
        at(15, "FlashsaleWebhookBacklog")])  # fmt: skip


def test_the_stranded_stock_alert_fires_after_a_minute_of_units_nobody_can_buy(
    prometheus: str,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    """Only the leading allocator reports the units (the others 0): the alert reads the
    highest. A minute of them fires it; the sale's end (0 again) clears it."""
    fired = firing("warning", "2 units of sale s-1 can no longer sell: its line reached the "
                   "cutoff and nobody in it is left to buy", "flashsalestockstranded",
                   sale="s-1")  # fmt: skip
    promtool_test(tmp_path, [
        {"series": 'flashsale_stock_stranded{sale="s-1", instance="leader"}',
         "values": "0 0 2 2 2 2 0 0"},
        {"series": 'flashsale_stock_stranded{sale="s-1", instance="other"}', "values": "0x7"},
    ], [at(2, "FlashsaleStockStranded"), at(4, "FlashsaleStockStranded", fired),
        at(7, "FlashsaleStockStranded")])  # fmt: skip


def test_the_full_waiting_room_alert_fires_while_newcomers_are_turned_away(
    prometheus: str,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    """A full line turns newcomers away (503 queue_full), and nothing said so. The leading
    allocator reports it at each pump step: a line that fills again as admissions free
    places reads full at one scrape and not at the next, and stays an alert; a minute with
    room clears it."""
    fired = firing("warning", "the waiting room of sale s-1 is full: new buyers are turned "
                   "away (503 queue_full) until the line moves or its cap is raised",
                   "flashsalequeuefull", sale="s-1")  # fmt: skip
    promtool_test(tmp_path, [
        {"series": 'flashsale_queue_full{sale="s-1", instance="leader"}',
         "values": "0 0 1 0 1 0 1 0 0 0"},
        {"series": 'flashsale_queue_full{sale="s-1", instance="other"}', "values": "0x9"},
    ], [at(1, "FlashsaleQueueFull"), at(2, "FlashsaleQueueFull", fired),
        at("210s", "FlashsaleQueueFull", fired), at("270s", "FlashsaleQueueFull")],
       interval="30s")  # fmt: skip


def test_the_preload_alert_fires_for_a_sale_opening_without_one(
    prometheus: str,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    """Two allocators list the sale from 10 minutes before its opening: a minute of it fires
    the alert; the preload (the series gone: stale at the next scrape) clears it."""
    fired = firing("critical", "sale s-1 opens within 10 minutes, or has opened, and was never "
                   "preloaded: every buyer is told it is not open yet",
                   "flashsalesalenotpreloaded", sale="s-1")  # fmt: skip
    promtool_test(tmp_path, [
        {"series": 'flashsale_sale_not_preloaded{sale="s-1", instance="a"}',
         "values": "_ 590 530 470 410 stale"},
        {"series": 'flashsale_sale_not_preloaded{sale="s-1", instance="b"}',
         "values": "_ 591 531 471 411 stale"},
    ], [at(1, "FlashsaleSaleNotPreloaded"), at(3, "FlashsaleSaleNotPreloaded", fired),
        at(6, "FlashsaleSaleNotPreloaded")])  # fmt: skip


def test_the_redis_memory_alert_fires_before_it_is_full(
    prometheus: str,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    """Full at its ``maxmemory``, Redis refuses every write (readiness then says so); the
    warning comes while there is still room, and not for a moment's peak."""
    fired = firing("warning", "Redis 10.0.0.7:6379 uses 95% of its maxmemory: full, it "
                   "refuses every write", "flashsaleredismemoryhigh",
                   node="10.0.0.7:6379")  # fmt: skip
    promtool_test(tmp_path, [
        {"series": 'flashsale_redis_memory_used_ratio{node="10.0.0.7:6379", instance="a"}',
         "values": "0.5 0.95 0.5 0.95 0.95 0.95 0.95 0.95"},
        {"series": 'flashsale_redis_memory_used_ratio{node="10.0.0.8:6379", instance="a"}',
         "values": "0.5x7"},
    ], [at(1, "FlashsaleRedisMemoryHigh"), at(3, "FlashsaleRedisMemoryHigh"),
        at(5, "FlashsaleRedisMemoryHigh", fired)])  # fmt: skip


def test_the_event_loop_alert_fires_on_a_stall_of_a_second(
    prometheus: str,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    """A loop held a second or more delays everything its process has in hand (a pump's
    lease lapses in 2 s). One such stall fires the alert; five minutes without one clear it,
    and stalls shorter than a second are not one."""
    fired = firing("warning", "the event loop of flashsale-allocator on a:9101 was held 1 s "
                   "or more in the last 5 minutes: everything it had in hand waited",
                   "flashsaleeventloopstalled", job="flashsale-allocator",
                   instance="a:9101")  # fmt: skip
    labels = 'job="flashsale-allocator", instance="a:9101"'
    promtool_test(tmp_path, [
        {"series": f"flashsale_event_loop_lag_seconds_count{{{labels}}}",
         "values": "0+240x5 1441+240x9"},
        {"series": f'flashsale_event_loop_lag_seconds_bucket{{{labels}, le="1.0"}}',
         "values": "0+240x15"},
    ], [at(3, "FlashsaleEventLoopStalled"), at(6, "FlashsaleEventLoopStalled", fired),
        at(13, "FlashsaleEventLoopStalled")])  # fmt: skip
