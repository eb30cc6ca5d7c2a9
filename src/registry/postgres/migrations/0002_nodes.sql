-- The nodes sharing the database, one row each, renewed by a heartbeat:
-- a node whose lease ran out is gone, and any other node settles its runs.
-- Times are the server's clock, so nodes' clocks need not agree.
CREATE TABLE nodes (
    node_id      TEXT COLLATE "C" PRIMARY KEY,
    started_at   TIMESTAMPTZ NOT NULL,
    heartbeat_at TIMESTAMPTZ NOT NULL,
    lease_until  TIMESTAMPTZ NOT NULL
);

-- The node that executes a run (that started it, for now).
ALTER TABLE runs ADD COLUMN node TEXT COLLATE "C";
CREATE INDEX runs_active_by_node ON runs (node) WHERE status IN ('queued', 'running');
