-- Each read model's ledger is its applied watermark plus the sparse set of commands applied
-- above it: every command at or below `position` is applied, and the ledger's rows at or below
-- it are pruned (`pruned` counts them, so the applied count stays exact).
CREATE TABLE applied_commands_watermark (
    singleton  boolean  PRIMARY KEY DEFAULT true CHECK (singleton),
    position   bigint   NOT NULL DEFAULT 0,
    pruned     bigint   NOT NULL DEFAULT 0
);
INSERT INTO applied_commands_watermark DEFAULT VALUES;
