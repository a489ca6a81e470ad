-- confirm: PAYING -> SOLD. The units stay counted against the buyer's limit.
--
-- KEYS: meta, stock, holds, deadlines, buyers, idem, outbox   ARGV: reservation ids (1..n)
-- Returns {ok, state, reason} per id, flattened: ok = 1 when the hold is (now or already) SOLD.
-- Ids are decided in order; an id given twice sees its own earlier outcome.
return move_holds(KEYS, ARGV, 'SOLD', 'paying', 'sold', function(_, h)
  if h.state ~= 'PAYING' then
    return 0, h.state, h.state == 'ACTIVE' and 'not_paying' or 'released'
  end
end)
