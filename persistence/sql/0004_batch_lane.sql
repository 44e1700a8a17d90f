-- Write lanes: each flusher process writes the batches of its own slice of
-- the entities; a batch records which lane cut it.
ALTER TABLE batchscheduler.batches ADD COLUMN lane smallint NOT NULL DEFAULT 0 CHECK (lane >= 0);
