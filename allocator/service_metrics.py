"""The allocator service's Prometheus metrics: what the pumps, the sweeper and the relay do,
the outbox backlog and the stock by SKU, kept to a bounded number of series."""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from allocator.discovery import NotPreloaded
from flashsale.ops_endpoints import build_info

# A sale with more SKUs (or stock buckets) than this is shown in the per-SKU metrics as one
# series, sku="*": 100,000 SKUs would be 300,000 series, set again at every count.
MAX_SKU_SERIES = 1000


@dataclass(frozen=True, slots=True)
class SaleSeries:
    """A sale's labelled series, as a pump's tick sets them."""

    leader: Gauge
    serving: Gauge
    tail: Gauge
    cutoff: Gauge
    pre_queue: Gauge
    waiting: Gauge
    outstanding: Gauge
    noshow: Gauge
    sold_out: Gauge
    stranded: Gauge
    full: Gauge
    admitted: Counter
    errors: Counter


class ServiceMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        build_info(registry, "allocator")
        self.admitted = Counter(
            "flashsale_pump_admitted", "Buyers admitted by this process's pumps", ["sale"],
            registry=registry,
        )  # fmt: skip
        self.leader = Gauge(
            "flashsale_pump_leader", "1 when this process leads the sale's pump", ["sale"],
            registry=registry,
        )  # fmt: skip
        self.serving = Gauge("flashsale_queue_serving", "Serving position", ["sale"],
                             registry=registry)  # fmt: skip
        self.tail = Gauge("flashsale_queue_tail", "Last position handed out", ["sale"],
                          registry=registry)  # fmt: skip
        self.cutoff = Gauge("flashsale_queue_cutoff", "Last position that may be admitted",
                            ["sale"], registry=registry)  # fmt: skip
        self.pre_queue = Gauge(
            "flashsale_queue_pre", "Buyers who joined before the opening, for the draw",
            ["sale"], registry=registry,
        )  # fmt: skip
        self.waiting = Gauge(
            "flashsale_queue_waiting", "Buyers in line who may still be admitted: those up to "
            "the cutoff, none once the sale is sold out", ["sale"], registry=registry,
        )  # fmt: skip
        self.outstanding = Gauge(
            "flashsale_queue_outstanding", "Admitted buyers who have not reserved yet", ["sale"],
            registry=registry,
        )  # fmt: skip
        self.noshow = Gauge("flashsale_queue_noshow_ratio", "Learned no-show ratio", ["sale"],
                            registry=registry)  # fmt: skip
        self.sold_out = Gauge("flashsale_sale_sold_out", "1 once the sale is sold out", ["sale"],
                              registry=registry)  # fmt: skip
        self.stranded = Gauge(
            "flashsale_stock_stranded", "Units free that nobody can buy any more: the line "
            "reached the cutoff and nobody in it is left to admit or within a turn", ["sale"],
            registry=registry,
        )  # fmt: skip
        self.full = Gauge(
            "flashsale_queue_full", "1 while the sale's waiting room holds its max_queue buyers "
            "not admitted yet: a newcomer is turned away (503 queue_full)", ["sale"],
            registry=registry,
        )  # fmt: skip
        self.not_preloaded = Gauge(
            "flashsale_sale_not_preloaded", "Seconds until a sale opens (less than 0: it has) "
            "that was never preloaded, for a sale opening within 10 minutes or open: its buyers "
            "are told it is not open yet", ["sale"], registry=registry,
        )  # fmt: skip
        self.skus_not_preloaded = Gauge(
            "flashsale_skus_not_preloaded", "SKUs added to a sale after its preload and not "
            "preloaded (no buyer can see or reserve them), for a sale opening within 10 "
            "minutes or open", ["sale"], registry=registry,
        )  # fmt: skip
        self.expired = Counter("flashsale_holds_expired", "Holds expired by the sweeper",
                               registry=registry)  # fmt: skip
        self.errors = Counter("flashsale_pump_errors", "Pump ticks that failed", ["sale"],
                              registry=registry)  # fmt: skip
        self.relayed = Counter("flashsale_relay_entries",
                               "Outbox stream entries published to Kafka and acknowledged",
                               registry=registry)  # fmt: skip
        self.backlog = Gauge("flashsale_outbox_backlog", "Outbox entries not yet published, by "
                             "SKU (and stock bucket)", ["sale", "sku", "bucket"],
                             registry=registry)  # fmt: skip
        self.stock = Gauge("flashsale_stock_units", "Units of a SKU by state (available, held: "
                           "in holds or on their way between stock buckets), as the sale's pump "
                           "last read them", ["sale", "sku", "state"],
                           registry=registry)  # fmt: skip
        self.memory = Gauge(
            "flashsale_redis_memory_used_ratio", "Memory Redis uses, as a share of its "
            "maxmemory (each primary of a cluster): full, it refuses every write", ["node"],
            registry=registry,
        )  # fmt: skip
        # Every series labelled by sale alone, dropped together (forget): the pumps' and the
        # discovery's, from one list so that none is left out.
        self.per_sale = (*(getattr(self, name) for name in SaleSeries.__slots__),
                         self.not_preloaded, self.skus_not_preloaded)  # fmt: skip
        self._series: dict[str, SaleSeries] = {}
        self._skus: dict[str, set[str]] = {}  # SKUs with stock series, by sale
        self._backlog_shown: dict[str, set[tuple[str, str, str]]] = {}  # by sale

    def note_backlog(
        self, now: dict[tuple[str, str, str], int], in_scope: Iterable[str] | None = None
    ) -> None:
        """The outbox backlog by (sale, SKU, bucket) of every SKU of the sales in ``now``,
        summed as ``sku="*"`` and ``bucket="*"`` for a sale with more than ``MAX_SKU_SERIES``
        of them. A measured sale's series not in ``now`` leave, and every series of a sale not
        ``in_scope`` (by default: the sales in ``now``)."""
        per_sale = collections.Counter(sale for sale, _, _ in now)
        shown: dict[str, dict[tuple[str, str, str], int]] = {}
        for (sale, sku, bucket), length in now.items():
            labels = (sale, "*", "*") if per_sale[sale] > MAX_SKU_SERIES else (sale, sku, bucket)
            part = shown.setdefault(sale, {})
            part[labels] = part.get(labels, 0) + length
        kept = set(per_sale if in_scope is None else in_scope)
        for sale in [s for s in self._backlog_shown if s not in kept]:
            shown[sale] = {}
        for sale, part in shown.items():
            for labels, length in part.items():
                self.backlog.labels(*labels).set(length)
            for labels in self._backlog_shown.pop(sale, set()) - set(part):
                with contextlib.suppress(KeyError):
                    self.backlog.remove(*labels)
            if part:
                self._backlog_shown[sale] = set(part)

    def note_stock(self, sale_id: str, stock: dict[str, tuple[int, int]]) -> None:
        """Units available and held by SKU, summed as ``sku="*"`` for a sale with more than
        ``MAX_SKU_SERIES`` SKUs."""
        if len(stock) > MAX_SKU_SERIES:
            stock = {"*": (sum(a for a, _ in stock.values()), sum(h for _, h in stock.values()))}
        for sku, (available, held) in stock.items():
            self.stock.labels(sale_id, sku, "available").set(available)
            self.stock.labels(sale_id, sku, "held").set(held)
        for sku in self._skus.get(sale_id, set()) - set(stock):
            for state in ("available", "held"):
                with contextlib.suppress(KeyError):
                    self.stock.remove(sale_id, sku, state)
        self._skus[sale_id] = set(stock)

    def note_memory(self, used: dict[str, float]) -> None:
        """Each Redis server's share of its ``maxmemory`` in use, and no other node's."""
        self.memory.clear()
        for node, share in used.items():
            self.memory.labels(node).set(share)

    def note_not_preloaded(self, found: NotPreloaded) -> None:
        """The sales open or opening soon without a preload, or with SKUs not preloaded, and
        none other."""
        self.not_preloaded.clear()
        for sale_id, seconds in found.sales.items():
            self.not_preloaded.labels(sale_id).set(seconds)
        self.skus_not_preloaded.clear()
        for sale_id, skus in found.skus.items():
            self.skus_not_preloaded.labels(sale_id).set(skus)

    def of(self, sale_id: str) -> SaleSeries:
        """The series a pump's tick sets for ``sale_id``, labelled once: ``labels`` takes a
        lock and builds a tuple each time, a dozen times a tick of every sale."""
        series = self._series.get(sale_id)
        if series is None:
            series = self._series[sale_id] = SaleSeries(**{
                name: getattr(self, name).labels(sale_id) for name in SaleSeries.__slots__
            })  # fmt: skip
        return series

    def forget(self, sale_id: str) -> None:
        """Drop a sale's series once it leaves scope: a dashboard of past sales would
        otherwise grow without end."""
        self._series.pop(sale_id, None)
        for metric in self.per_sale:
            with contextlib.suppress(KeyError):
                metric.remove(sale_id)
        for sku in self._skus.pop(sale_id, set()):
            for state in ("available", "held"):
                with contextlib.suppress(KeyError):
                    self.stock.remove(sale_id, sku, state)
