-- A group commit's token, stored on the first command of the group only (the others share its
-- txid), so that a write whose connection dropped after the statement was sent can learn
-- whether its group committed. NULL for every other row: no space, one index entry per group.
ALTER TABLE commands ADD COLUMN batch uuid;
CREATE INDEX commands_batch_idx ON commands (batch) WHERE batch IS NOT NULL;
