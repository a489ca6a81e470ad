-- 0020: idempotent stock changes.
--
-- A stock change that carries an Idempotency-Key (admin API header, `sale add-stock` and
-- `sale remove-stock --idempotency-key`) records it, per sale, with what it changed; a retry
-- with the same key (its answer was lost) changes nothing and answers as the first did, and
-- the same key with another change is refused. The keys go with their sale.
CREATE TABLE IF NOT EXISTS stock_changes (
    sale_id     text        NOT NULL REFERENCES sales (id) ON DELETE CASCADE,
    key         text        NOT NULL,
    fingerprint text        NOT NULL,
    made_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sale_id, key)
);
