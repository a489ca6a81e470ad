"""Metrics the SREs read: per-sale series leave with their sale, and every service says
which build it runs."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from allocator.service import ServiceMetrics
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
