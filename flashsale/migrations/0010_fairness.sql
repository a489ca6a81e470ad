-- 0010: the pre-queue's published order.
--
-- Once a sale's pre-queue is shuffled, its members (sha256 of sale id and buyer id, never the
-- buyer id) are recorded in position order with a Merkle root over them, so anyone can check
-- every position against the revealed seed (flashsale/fairness.py).
CREATE TABLE IF NOT EXISTS prequeue_members (
    sale_id  text    NOT NULL REFERENCES sales (id),
    position integer NOT NULL CHECK (position >= 1),
    member   text    NOT NULL,
    PRIMARY KEY (sale_id, position)
);
ALTER TABLE sales ADD COLUMN IF NOT EXISTS prequeue_root text;
ALTER TABLE sales ADD COLUMN IF NOT EXISTS prequeue_size integer;

-- The commitment as published before the start, kept as it was: a seed changed afterwards no
-- longer matches it (the check recomputes nothing it is meant to hold against).
ALTER TABLE sales ADD COLUMN IF NOT EXISTS shuffle_commitment text;
UPDATE sales SET shuffle_commitment = encode(sha256(convert_to(shuffle_seed, 'UTF8')), 'hex')
WHERE shuffle_commitment IS NULL;
