-- 0006: outbox payloads stored as written.
--
-- One outbox row holds a whole statement's events (a JSON array of up to 2,000 events,
-- hundreds of kB). Postgres compressed each one with pglz on insert (a visible share of its
-- CPU in bench pipeline) for a row that lives until the publisher has sent it, usually well
-- under a second. EXTERNAL keeps large values out of line, uncompressed.
ALTER TABLE outbox ALTER COLUMN payload SET STORAGE EXTERNAL;
