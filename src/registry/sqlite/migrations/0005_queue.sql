-- Runs queued for whichever claimer takes them, on the same queue verbs as
-- several nodes on one PostgreSQL database (one process holds this file:
-- its own claimer is the only one), and the attempt each claim makes.
ALTER TABLE runs ADD COLUMN claimable INTEGER;
ALTER TABLE runs ADD COLUMN attempt INTEGER;
CREATE INDEX runs_claimable ON runs (module_id, module_version, id)
    WHERE claimable = 1 AND status = 'queued';
