-- 0011: a proof-of-work challenge at join, per sale.
--
-- join_challenge is the number of leading zero bits the SHA-256 of a challenge and its
-- solution must have (0: no challenge). A bot then pays for each place in compute, as a
-- person's browser does once (gateway/challenge.py).
ALTER TABLE sales ADD COLUMN IF NOT EXISTS join_challenge smallint NOT NULL DEFAULT 0;
ALTER TABLE sales DROP CONSTRAINT IF EXISTS sales_join_challenge_check,
    ADD CONSTRAINT sales_join_challenge_check CHECK (join_challenge BETWEEN 0 AND 24);
