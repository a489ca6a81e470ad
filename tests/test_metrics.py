"""Metrics the SREs read: per-sale series leave with their sale, and every service says
which build it runs and how late its event loop runs."""

from __future__ import annotations

import asyncio
import re
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from allocator.service_metrics import MAX_SKU_SERIES, ServiceMetrics
from flashsale import __version__, event_loop
from reconciler.report import PassReport, ReconcileMetrics


def test_a_sale_that_leaves_scope_takes_its_series_with_it() -> None:
    registry = CollectorRegistry()
    m = ServiceMetrics(registry)
    for sale in ("sale-a", "sale-b"):
        m.serving.labels(sale).set(10)
        m.noshow.labels(sale).set(0.2)
        m.note_stock(sale, {"SKU-1": (5, 2)})
    m.forget("sale-a")
    text = generate_latest(registry).decode()
    assert 'sale="sale-a"' not in text
    assert 'flashsale_queue_serving{sale="sale-b"} 10.0' in text
    assert 'flashsale_stock_units{sale="sale-b",sku="SKU-1",state="held"} 2.0' in text
    assert 'flashsale_queue_noshow_ratio{sale="sale-b"}' in text
    assert 'flashsale_build_info{python="' in text and f'version="{__version__}"' in text
    assert "process_resident_memory_bytes" in text
    assert "flashsale_event_loop_lag_seconds_count" in text


def test_every_series_of_a_sale_leaves_with_it() -> None:
    """``flashsale_queue_full{sale}`` stayed after its sale left scope, one more series for
    every sale the allocator ever served: each per-sale series the pumps set leaves."""
    registry = CollectorRegistry()
    m = ServiceMetrics(registry)
    per_sale = [metric for metric in vars(m).values()
                if isinstance(metric, Counter | Gauge)
                and metric._labelnames == ("sale",)]  # fmt: skip
    assert len(per_sale) >= 13, per_sale  # what the pumps set, and their errors
    for metric in per_sale:
        if isinstance(metric, Counter):
            metric.labels("sale-a").inc()
        else:
            metric.labels("sale-a").set(1)
    m.forget("sale-a")
    assert 'sale="sale-a"' not in generate_latest(registry).decode()


def test_no_service_says_when_each_series_was_created() -> None:
    """The allocator, the workers and the reconciler showed a ``_created`` series beside each
    counter and histogram (9 to 15 of them), the gateway (several processes, one folder of
    metrics) none: the same counter read differently by service, and series Prometheus
    stores for nothing."""
    registry = CollectorRegistry()
    m = ServiceMetrics(registry)
    m.note_stock("sale-a", {"SKU-1": (5, 2)})
    reconcile = CollectorRegistry()
    ReconcileMetrics(reconcile)
    for text in (generate_latest(registry).decode(), generate_latest(reconcile).decode()):
        assert "_created" not in text, [line for line in text.splitlines() if "_created" in line]


def _late(text: str, seconds: str) -> float:
    """The samples of the lag histogram in ``text`` later than ``seconds``."""
    pattern = r'^flashsale_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)$'
    found = {le: float(value) for le, value in re.findall(pattern, text, re.M)}
    return found["+Inf"] - found[seconds]


def test_a_service_measures_how_late_its_event_loop_runs() -> None:
    """A loop held by one stretch of work (a catalogue's count parsed in one go held the
    allocator's for 1.4 s, and every pump's lease lapsed) shows in every service's metrics:
    how late the loop ran a timer it set."""
    registry = CollectorRegistry()
    ServiceMetrics(registry)
    before = _late(generate_latest(registry).decode(), "0.5")

    async def stalled() -> None:
        await asyncio.sleep(0.4)  # the loop's watch has set its timer
        time.sleep(0.8)  # noqa: ASYNC251 - the stretch that holds the loop
        await asyncio.sleep(0.4)

    event_loop.run(stalled())
    assert _late(generate_latest(registry).decode(), "0.5") == before + 1


def test_a_sale_of_many_skus_is_one_series_per_state_not_one_per_sku() -> None:
    """A sale of 100,000 SKUs gave the allocator 200,000 stock series and 100,000 backlog
    series, each set again at every count: most of a process's time, and a scrape of tens
    of megabytes. Past ``MAX_SKU_SERIES`` SKUs a sale is shown summed, as ``sku="*"``."""
    registry = CollectorRegistry()
    m = ServiceMetrics(registry)
    big = {f"SKU-{i}": (2, 1) for i in range(MAX_SKU_SERIES + 1)}
    m.note_stock("sale-big", big)
    m.note_stock("sale-small", {"SKU-1": (5, 2)})
    m.note_backlog({("sale-big", sku, "0"): 1 for sku in big} | {("sale-small", "SKU-1", "0"): 3})
    text = generate_latest(registry).decode()
    lines = [line for line in text.splitlines() if 'sale="sale-big"' in line]
    assert sorted(lines) == [
        f'flashsale_outbox_backlog{{bucket="*",sale="sale-big",sku="*"}} {len(big)}.0',
        f'flashsale_stock_units{{sale="sale-big",sku="*",state="available"}} {2 * len(big)}.0',
        f'flashsale_stock_units{{sale="sale-big",sku="*",state="held"}} {len(big)}.0',
    ]
    assert 'flashsale_stock_units{sale="sale-small",sku="SKU-1",state="held"} 2.0' in text
    assert 'flashsale_outbox_backlog{bucket="0",sale="sale-small",sku="SKU-1"} 3.0' in text
    m.note_backlog({("sale-small", "SKU-1", "0"): 0})  # the big sale left scope
    text = generate_latest(registry).decode()
    assert not [
        line
        for line in text.splitlines()
        if line.startswith("flashsale_outbox_backlog{") and 'sale="sale-big"' in line
    ]
    m.note_stock("sale-big", {"SKU-1": (1, 0)})  # down to one SKU: its own series again
    text = generate_latest(registry).decode()
    assert 'flashsale_stock_units{sale="sale-big",sku="SKU-1",state="available"} 1.0' in text
    assert 'sale="sale-big",sku="*"' not in text


def test_a_backlog_measured_sale_by_sale_keeps_the_other_sales_series() -> None:
    """The backlog gauge measures each sale at its own pace: a round that measured one sale
    leaves the others' series as they were, drops the SKUs the measured sale no longer has,
    and every series of a sale that left the scope."""
    registry = CollectorRegistry()
    m = ServiceMetrics(registry)

    def shown() -> set[str]:
        text = generate_latest(registry).decode()
        return {line for line in text.splitlines() if line.startswith("flashsale_outbox_backlog{")}

    m.note_backlog({("a", "K1", "0"): 1, ("a", "K2", "0"): 2, ("b", "K1", "0"): 3})
    m.note_backlog({("b", "K1", "0"): 4}, in_scope=["a", "b"])
    assert shown() == {
        'flashsale_outbox_backlog{bucket="0",sale="a",sku="K1"} 1.0',
        'flashsale_outbox_backlog{bucket="0",sale="a",sku="K2"} 2.0',
        'flashsale_outbox_backlog{bucket="0",sale="b",sku="K1"} 4.0',
    }
    m.note_backlog({("a", "K1", "0"): 0}, in_scope=["a"])  # K2 settled, b left the scope
    assert shown() == {'flashsale_outbox_backlog{bucket="0",sale="a",sku="K1"} 0.0'}


def test_the_reconcilers_gauges_add_up_the_last_pass_over_each_sale() -> None:
    """The service's passes take turns of sales. "Unresolved" set from the last pass alone
    went back to 0 at each turn of a sale with nothing unresolved, and an alert on it would
    never hold; each sale's last pass now counts, once however many sales it was over."""
    m = ReconcileMetrics(CollectorRegistry())
    m.count(PassReport(skus=600, unresolved=["a: the provider answered 500"]), ["a", "b"])
    m.count(PassReport(skus=1), ["c"])
    assert (m.skus._value.get(), m.unresolved._value.get()) == (601, 1)
    m.count(PassReport(skus=1), ["b"])  # the first pass still stands for a
    assert (m.skus._value.get(), m.unresolved._value.get()) == (602, 1)
    m.count(PassReport(skus=600), ["a"])
    assert m.unresolved._value.get() == 0
    m.keep(["c"])  # a and b left the scope
    assert m.skus._value.get() == 1
    m.count(PassReport(skus=5, unresolved=["x", "y"]))  # a whole pass (--once)
    assert (m.skus._value.get(), m.unresolved._value.get()) == (5, 2)
