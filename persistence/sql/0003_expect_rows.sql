-- Guard for the flusher's optimistic write: it updates entities it has
-- cached, each only if its version is the one it cached. If any row was
-- changed behind its back, fewer rows match; this raises so the whole
-- transaction rolls back (COMMIT is already queued in the same round trip)
-- and the flusher redoes the batch from fresh reads.
CREATE FUNCTION batchscheduler.expect_rows(actual bigint, expected bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    IF actual <> expected THEN
        RAISE EXCEPTION 'stale entity cache: % of % entities matched their cached version', actual, expected
            USING ERRCODE = 'BS001';
    END IF;
    RETURN actual;
END $$;
