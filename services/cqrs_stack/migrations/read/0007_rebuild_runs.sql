-- Blue/green rebuilds: the progress of each run (what `cqrs-stack rebuild` and the operator
-- show), and the version of each read model that is live (and the one kept for rollback).
-- Both stay in the live schema: a rebuild swaps a model's tables, never these.
CREATE TABLE rebuild_runs (
    run_id text PRIMARY KEY,
    models text[] NOT NULL,
    version integer NOT NULL,
    -- load | catch-up | verify | swap | done | failed | cancelled | rolled-back
    phase text NOT NULL CHECK (phase IN ('load', 'catch-up', 'verify', 'swap', 'done',
                                         'failed', 'cancelled', 'rolled-back')),
    done bigint NOT NULL DEFAULT 0,
    total bigint NOT NULL DEFAULT 0,
    started_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    error text
);
CREATE INDEX rebuild_runs_started ON rebuild_runs (started_at);

-- One row per model once a rebuild (or rollback) has swapped one in; a model without a row
-- is at version 1, the version its migrations created.
CREATE TABLE read_model_versions (
    model text PRIMARY KEY,
    version integer NOT NULL,
    built_at timestamptz,
    -- The version the last swap replaced, kept in the schema cqrs_previous until then.
    previous_version integer,
    previous_kept_until timestamptz
);
