-- What a capsule's timeout measures: 'idle' = inactivity (the Wrenn API: activity moves
-- it), 'deadline' = an end time (the E2B API: only set-timeout and connect move it).
ALTER TABLE capsules ADD COLUMN timeout_kind TEXT NOT NULL DEFAULT 'idle' CHECK (timeout_kind IN ('idle', 'deadline'));
-- What a pause on timeout keeps: 'full' (memory and disk) or 'disk' (the disk only;
-- the resume boots afresh).
ALTER TABLE capsules ADD COLUMN timeout_pause TEXT NOT NULL DEFAULT 'full' CHECK (timeout_pause IN ('full', 'disk'));
