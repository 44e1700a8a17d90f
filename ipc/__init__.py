"""Inter-process plumbing: rings, cursors, wake-ups, framing. Knows nothing of
PostgreSQL or of game rules."""
