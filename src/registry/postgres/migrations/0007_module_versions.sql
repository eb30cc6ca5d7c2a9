-- The component bytes of every module version a node loaded, by content
-- hash, so that any node can run a run pinned to a version it did not
-- load itself. Nodes check the bytes against the hash before compiling.
CREATE TABLE module_versions (
    hash       TEXT COLLATE "C" PRIMARY KEY,
    module_id  TEXT COLLATE "C" NOT NULL,
    bytes      BYTEA NOT NULL,
    stored_at  BIGINT NOT NULL
);
