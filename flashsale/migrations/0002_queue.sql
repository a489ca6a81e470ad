-- 0002: the waiting room. See DESIGN §3 and gateway/queue.py.

-- The pre-queue shuffle seed: random per sale, its SHA-256 is published before the start and
-- the seed itself after, so anyone can recompute the pre-queue order. Existing rows get a
-- random seed too (gen_random_uuid is built in since PostgreSQL 13).
ALTER TABLE sales
    ADD COLUMN shuffle_seed text NOT NULL
        DEFAULT replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''),
    -- Seconds an admitted buyer has to reserve before the slot lapses to the next buyer.
    ADD COLUMN admission_window_seconds integer NOT NULL DEFAULT 60
        CHECK (admission_window_seconds BETWEEN 5 AND 3600),
    -- At most this many admitted buyers may be unfinished (admitted, not yet reserved).
    ADD COLUMN admission_capacity integer NOT NULL DEFAULT 1000
        CHECK (admission_capacity > 0);
