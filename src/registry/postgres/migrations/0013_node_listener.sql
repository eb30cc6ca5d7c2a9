-- The application name of each node's listening session. A node frozen
-- (stopped, suspended) keeps that session open without reading from it,
-- and the server keeps every notification since for it: the server's
-- notification queue fills (8 GB by default), after which every write
-- that announces a change fails, on every node. The node that settles a
-- lost node's runs ends that session.
ALTER TABLE nodes ADD COLUMN listener TEXT;
