-- put_sale: replace the sale-level configuration hash with the given field/value pairs.
--
-- KEYS[1] sale hash   ARGV field/value pairs
-- Returns the number of fields written.
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV))
return #ARGV / 2
