-- 0016: the longest hold TTL of a sale's SKUs, read from the index.
--
-- The allocator's discovery (every 2 s, in each process) and the reconciler's scope (each
-- pass) take the sales in which a hold can still live: those whose end plus their SKUs'
-- longest hold TTL is still ahead. With this index that maximum is one index probe per sale,
-- and only those sales' SKUs are read; before, every SKU of every sale ever preloaded was
-- joined and filtered afterwards, a cost that grew with the history.
CREATE INDEX IF NOT EXISTS sale_skus_hold_ttl ON sale_skus (sale_id, hold_ttl_seconds);
