-- The catch-up sweep pages through commands in (txid, id) order from a stored cursor: one
-- index serves both that keyset scan and the look-up of one late transaction's commands.
CREATE INDEX commands_txid_id_idx ON commands (txid, id);
DROP INDEX commands_txid_idx;
