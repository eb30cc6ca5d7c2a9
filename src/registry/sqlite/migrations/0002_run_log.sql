-- A run's own log: what its module logged, then its captured standard
-- output and error, as a JSON array of entries (capped by the host).
ALTER TABLE runs ADD COLUMN log TEXT;
