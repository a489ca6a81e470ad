-- 0018: the outbox is emptied as it is published.
--
-- The order-events publisher marked each row published and kept it: a second copy of every
-- order event (about 430 bytes an order), growing sale after sale, that nothing reads again
-- (`order_events` is the log). The publisher now deletes the rows it published, in the
-- transaction that locked them after the broker acknowledged them; this takes out the rows
-- published before. A publisher of the previous release still marks its rows instead, which
-- stays correct: only unpublished rows are ever read.
DELETE FROM outbox WHERE published_at IS NOT NULL;
