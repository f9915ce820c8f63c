-- Each key's version: its number of commands. Conditional writes (If-Match, If-None-Match)
-- check it, and every write increments it in the statement that stores its commands, taking
-- the row's lock before the commands get their ids; so per key, versions and positions grow
-- in the same order. A writer takes the key's advisory try-lock first (write_db.py), so it
-- never waits on this row: a key another transaction holds is tried again later.
CREATE TABLE key_versions (
    key      text    PRIMARY KEY,
    version  bigint  NOT NULL
) WITH (fillfactor = 80);  -- room for HOT updates: an increment touches no index

-- The commands already stored, counted while writers wait (SHARE blocks INSERTs, not reads).
LOCK TABLE commands IN SHARE MODE;
INSERT INTO key_versions (key, version) SELECT key, count(*) FROM commands GROUP BY key;
