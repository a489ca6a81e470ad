-- 0021: a sale's SKUs keep the order they were given in.
--
-- They were listed by their SKU's spelling (SNK-0, SNK-1, SNK-10, ..., SNK-2): the waiting-room
-- page, which shows the first few, skipped most of a run of sizes, and a `sale show --template`
-- round trip reshuffled the merchandiser's file. `position` is each SKU's place in its sale
-- file, then in each import after it (the sale's row is locked while one is numbered). A
-- column without a default: adding it rewrites nothing. The SKUs of a sale made before it
-- have none, and come first, by SKU, as they did.
ALTER TABLE sale_skus ADD COLUMN IF NOT EXISTS position integer;
