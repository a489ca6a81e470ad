-- 0009: stock buckets.
--
-- A SKU can be split into `buckets` groups of Redis keys, each on its own slot, so one hot
-- SKU's decisions spread over several Redis cores. Fixed once the SKU is created (the number
-- of buckets of a preloaded SKU never changes). An order's bucket is part of its reservation
-- id (see allocator/ids.py): order_bucket(id) below reads it, so orders need no column.
ALTER TABLE sale_skus ADD COLUMN IF NOT EXISTS buckets smallint NOT NULL DEFAULT 1;
ALTER TABLE sale_skus DROP CONSTRAINT IF EXISTS sale_skus_buckets_check,
    ADD CONSTRAINT sale_skus_buckets_check CHECK (buckets BETWEEN 1 AND 64);

-- The stock bucket of an order: the bucket a bucketed reservation id names
-- (<sale>~<sku>~<bucket>.<buckets>~r-...), else 0.
CREATE OR REPLACE FUNCTION order_bucket(id text) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT CASE WHEN id ~ '^[^~]+~[^~]+~[1-9][0-9]{0,2}\.[1-9][0-9]{0,2}~'
                THEN split_part(split_part(id, '~', 3), '.', 1)::integer
                ELSE 0 END
$$;
