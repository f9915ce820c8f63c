-- The catch-up sweep's position in the write DB. The cursor (cursor_txid, cursor_id) is the
-- last command swept in (txid, id) order; every command before it was swept, except those of
-- the transactions in projector_catchup_pending, which were still open when the cursor went
-- past their id. So a transaction that stays open pins nothing but its own row here.
ALTER TABLE projector_catchup
    ADD COLUMN cursor_txid xid8   NOT NULL DEFAULT '0'::xid8,
    ADD COLUMN cursor_id   bigint NOT NULL DEFAULT 0;
-- Everything below the old watermark was swept: the cursor starts there.
UPDATE projector_catchup SET cursor_txid = watermark;

-- Write-DB transactions that were open when the cursor passed them: swept once they end.
-- after_id: their commands up to this id are swept already (a large one is paged).
CREATE TABLE projector_catchup_pending (
    txid      xid8    PRIMARY KEY,
    after_id  bigint  NOT NULL DEFAULT 0
);
