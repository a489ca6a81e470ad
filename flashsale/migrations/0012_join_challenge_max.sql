-- 0012: a join challenge whose difficulty follows the join rate.
--
-- join_challenge_max is the most leading zero bits the challenge may ask when joins arrive
-- faster than the sale admits (gateway/challenge.py): one more bit, twice the work, for each
-- doubling of the join rate over the admission rate. 0 keeps the difficulty at
-- join_challenge.
ALTER TABLE sales ADD COLUMN IF NOT EXISTS join_challenge_max smallint NOT NULL DEFAULT 0;
ALTER TABLE sales DROP CONSTRAINT IF EXISTS sales_join_challenge_max_check,
    ADD CONSTRAINT sales_join_challenge_max_check CHECK (
        join_challenge_max = 0
        OR (join_challenge_max BETWEEN 1 AND 24 AND join_challenge_max >= join_challenge));
