-- rebuild_begin: close a SKU for reservations while the reconciler rebuilds it.
--
-- KEYS: meta, stock, holds, deadlines, buyers, idem, outbox
-- From here until rebuild_finish, reserve answers `unavailable` (never a wrong sold_out, never
-- a grant on counters about to be replaced). Hold transitions go on: rebuild_finish recounts
-- every counter from the holds themselves. Returns 1.
redis.call('HSET', KEYS[1], 'rebuilding', 1)
return 1
