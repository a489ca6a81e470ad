"""Metrics the SREs read: per-sale series leave with their sale, and every service says
which build it runs."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from allocator.service import MAX_SKU_SERIES, ServiceMetrics
from flashsale import __version__


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
