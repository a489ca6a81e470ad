-- 0013: an idempotent sale creation.
--
-- A create that carries an Idempotency-Key (admin API header, `sale create
-- --idempotency-key`) records it with a fingerprint of what was asked; a retry with the same
-- key gets the same sale instead of a second one, and the same key with another request is
-- refused.
ALTER TABLE sales ADD COLUMN IF NOT EXISTS create_key text;
ALTER TABLE sales ADD COLUMN IF NOT EXISTS create_fingerprint text;
CREATE UNIQUE INDEX IF NOT EXISTS sales_create_key ON sales (create_key)
    WHERE create_key IS NOT NULL;
