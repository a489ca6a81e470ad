-- 0001: the source of truth. See DESIGN §5.

CREATE TABLE sales (
    id              text PRIMARY KEY,
    name            text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    starts_at       timestamptz NOT NULL,
    ends_at         timestamptz NOT NULL,
    admission_rate  integer     NOT NULL CHECK (admission_rate > 0),
    max_queue       integer     NOT NULL CHECK (max_queue > 0),
    -- active: follows its schedule; paused: refuses reservations; ended: terminal.
    status          text        NOT NULL DEFAULT 'active'
                                CHECK (status IN ('active', 'paused', 'ended')),
    preloaded_at    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (ends_at > starts_at)
);

CREATE TABLE sale_skus (
    sale_id          text    NOT NULL REFERENCES sales (id) ON DELETE CASCADE,
    sku              text    NOT NULL,
    title            text    NOT NULL,
    stock_total      integer NOT NULL CHECK (stock_total > 0),
    price            bigint  NOT NULL CHECK (price >= 0),
    currency         char(3) NOT NULL,
    per_buyer_limit  integer NOT NULL CHECK (per_buyer_limit >= 1),
    hold_ttl_seconds integer NOT NULL CHECK (hold_ttl_seconds > 0),
    -- The per-SKU sold counter. The CHECK is the last guard against oversell (invariant 1).
    sold             integer NOT NULL DEFAULT 0 CHECK (sold >= 0 AND sold <= stock_total),
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sale_id, sku)
);

-- id = reservation id, so every effect of the saga is keyed by it and replays are harmless.
CREATE TABLE orders (
    id             text PRIMARY KEY,
    sale_id        text    NOT NULL,
    sku            text    NOT NULL,
    buyer_id       text    NOT NULL,
    quantity       integer NOT NULL CHECK (quantity > 0),
    amount         bigint  NOT NULL CHECK (amount >= 0),
    currency       char(3) NOT NULL,
    admission_id   text    NOT NULL,
    payment_token  text    NOT NULL,
    state          text    NOT NULL
                   CHECK (state IN ('PENDING', 'PAYING', 'CONFIRMED', 'PAYMENT_FAILED',
                                    'EXPIRED', 'CANCELLED')),
    version        integer NOT NULL DEFAULT 1,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (sale_id, sku) REFERENCES sale_skus (sale_id, sku)
);
CREATE INDEX orders_by_sku_state ON orders (sale_id, sku, state);
CREATE INDEX orders_by_buyer ON orders (sale_id, buyer_id);

-- Append-only: every transition with time and cause. UPDATE and DELETE are refused below.
CREATE TABLE order_events (
    id          bigserial PRIMARY KEY,
    order_id    text        NOT NULL REFERENCES orders (id),
    seq         integer     NOT NULL,
    type        text        NOT NULL,
    from_state  text,
    to_state    text,
    cause       text        NOT NULL,
    data        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (order_id, seq)
);

CREATE FUNCTION order_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'order_events is append-only (% refused)', TG_OP;
END $$;

CREATE TRIGGER order_events_no_update BEFORE UPDATE OR DELETE ON order_events
    FOR EACH ROW EXECUTE FUNCTION order_events_append_only();

CREATE TABLE payments (
    id               bigserial PRIMARY KEY,
    idempotency_key  text        NOT NULL UNIQUE,
    order_id         text        NOT NULL,
    provider_ref     text,
    amount           bigint      NOT NULL CHECK (amount >= 0),
    currency         char(3)     NOT NULL,
    state            text        NOT NULL
                     CHECK (state IN ('PENDING', 'CAPTURED', 'DECLINED', 'REFUNDED', 'UNKNOWN')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX payments_by_order ON payments (order_id);

-- Processed event ids per consumer: the dedupe that makes at-least-once delivery harmless.
CREATE TABLE inbox (
    consumer      text        NOT NULL,
    event_id      text        NOT NULL,
    processed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

-- Order events waiting to be published to Kafka (transactional outbox).
CREATE TABLE outbox (
    id            bigserial PRIMARY KEY,
    topic         text        NOT NULL,
    key           text        NOT NULL,
    payload       jsonb       NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
