-- 0019: the SKUs of a sale that were never preloaded, found by an index probe.
--
-- The allocators' discovery (every 2 s, in each process) counts, for each sale open or
-- about to open, the SKUs added after its preload and not preloaded since: no buyer can see
-- or reserve them (the metric flashsale_skus_not_preloaded). Only such SKUs are in this
-- index, so the count reads them alone and not every SKU of a large sale.
CREATE INDEX IF NOT EXISTS sale_skus_not_preloaded ON sale_skus (sale_id)
    WHERE preloaded_at IS NULL;
