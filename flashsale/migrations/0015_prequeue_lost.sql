-- 0015: a pre-queue order that can never be recorded.
--
-- The pump records the pre-queue's order from the positions Redis holds (0010). When Redis
-- lost the waiting room after the draw and before that record was written, the restored
-- room lacks those positions and the order can never be recorded; prequeue_lost_at says so,
-- so the fairness record answers why instead of "not recorded yet" for good.
ALTER TABLE sales ADD COLUMN IF NOT EXISTS prequeue_lost_at timestamptz;
