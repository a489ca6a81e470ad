-- 0014: archived sales.
--
-- Archiving an ended sale (`flashsale sale archive`, or the reconciler once
-- FLASHSALE_ARCHIVE_AFTER has passed) records its passing audit here, then deletes its
-- per-buyer Redis state. archived_at: from then on Postgres answers for the sale (its
-- reservations, its audit) and the reconciler leaves it alone; redis_cleared_at: Redis's
-- share is deleted too (an archive interrupted between the two is finished by the next).
ALTER TABLE sales ADD COLUMN IF NOT EXISTS archived_at timestamptz;
ALTER TABLE sales ADD COLUMN IF NOT EXISTS archive_audit jsonb;
ALTER TABLE sales ADD COLUMN IF NOT EXISTS redis_cleared_at timestamptz;
