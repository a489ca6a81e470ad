-- 0007: the reconciler (reconciler/, DESIGN §7).
--
-- Postgres is the truth the reconciler rebuilds Redis from, so it keeps what a rebuild needs:
-- the idempotency key of each order (restores the buyer's remembered answer and the admission
-- claim), which SKUs have ever been preloaded (a later preload must not recreate a lost SKU
-- from scratch), and the waiting-room counters gateways and pumps have seen.
ALTER TABLE orders ADD COLUMN IF NOT EXISTS idempotency_key text NOT NULL DEFAULT '';
ALTER TABLE sale_skus ADD COLUMN IF NOT EXISTS preloaded_at timestamptz;
UPDATE sale_skus k SET preloaded_at = s.preloaded_at
FROM sales s WHERE s.id = k.sale_id AND k.preloaded_at IS NULL;

-- Every repair, with the values before and after: an audit trail, and what metrics count.
CREATE TABLE IF NOT EXISTS reconcile_events (
    id          bigserial PRIMARY KEY,
    sale_id     text        NOT NULL,
    sku         text,                     -- NULL: about the sale (its waiting room)
    kind        text        NOT NULL,
    subject     text,                     -- a reservation id, where one is concerned
    before      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    after       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS reconcile_events_by_sale ON reconcile_events (sale_id, id);

-- The highest waiting-room counters each gateway process and pump has seen, checkpointed
-- about once a second. A queue Redis lost is restored to at least these, so no position is
-- handed out twice and no admitted buyer loses the admission.
CREATE TABLE IF NOT EXISTS queue_marks (
    sale_id     text        NOT NULL,
    source      text        NOT NULL,     -- gateway:<host>:<pid> or pump:<owner>
    tail        bigint      NOT NULL DEFAULT 0,
    serving     bigint      NOT NULL DEFAULT 0,
    pre         bigint      NOT NULL DEFAULT 0,
    cutoff      bigint,                   -- the smallest published cutoff (NULL: none seen)
    sealed      boolean     NOT NULL DEFAULT false,
    shuffled    boolean     NOT NULL DEFAULT false,
    sold_out    boolean     NOT NULL DEFAULT false,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sale_id, source)
);
