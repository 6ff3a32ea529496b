-- Whether traffic through the proxy (or an SDK connect) to the paused capsule resumes
-- it: 'on' or 'off' (E2B's autoResume).
ALTER TABLE capsules ADD COLUMN auto_resume TEXT NOT NULL DEFAULT 'off' CHECK (auto_resume IN ('on', 'off'));
