-- The catch-up sweep's cursor and pending transactions, one set per read model: a replica
-- sweeps each model it keeps from that model's own position, so a replica that keeps fewer
-- models (READ_MODELS differs during a rolling update) never moves the sweep past commands a
-- model it does not keep still lacks. The existing row is records' (every replica keeps it);
-- another model's row is created, at the start of the write DB, by its first sweep.
ALTER TABLE projector_catchup ADD COLUMN model text NOT NULL DEFAULT 'records';
ALTER TABLE projector_catchup DROP CONSTRAINT projector_catchup_pkey;
ALTER TABLE projector_catchup ADD PRIMARY KEY (model);
ALTER TABLE projector_catchup ALTER COLUMN model DROP DEFAULT;

ALTER TABLE projector_catchup_pending ADD COLUMN model text NOT NULL DEFAULT 'records';
ALTER TABLE projector_catchup_pending DROP CONSTRAINT projector_catchup_pending_pkey;
ALTER TABLE projector_catchup_pending ADD PRIMARY KEY (model, txid);
ALTER TABLE projector_catchup_pending ALTER COLUMN model DROP DEFAULT;
