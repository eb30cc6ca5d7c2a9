-- The version of each module that every node runs: the newest component
-- file any node loaded for it, by the file's modification time. A node
-- whose own file is older runs this version instead, fetched by hash from
-- module_versions (and checked against it), under its own manifest.
CREATE TABLE module_heads (
    module_id     TEXT COLLATE "C" PRIMARY KEY,
    hash          TEXT COLLATE "C" NOT NULL,
    -- The file's modification time, in nanoseconds since the epoch.
    modified      BIGINT NOT NULL,
    node          TEXT NOT NULL,
    published_at  BIGINT NOT NULL
);
