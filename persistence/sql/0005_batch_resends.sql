-- A batch row counts what that batch stored: size = its new intent_log rows;
-- resends = intents in it answered from an earlier batch's stored outcome
-- (duplicates, seq_reused). A batch of resends only stores no row.
ALTER TABLE batchscheduler.batches ADD COLUMN resends integer NOT NULL DEFAULT 0 CHECK (resends >= 0);
