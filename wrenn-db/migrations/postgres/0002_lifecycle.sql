-- What the inactivity timeout does ('pause' or 'kill'), the capsule's disk size, and the
-- sample history of paused capsules.
ALTER TABLE capsules ADD COLUMN on_timeout TEXT NOT NULL DEFAULT 'pause' CHECK (on_timeout IN ('pause', 'kill'));
ALTER TABLE capsules ADD COLUMN disk_mb BIGINT NOT NULL DEFAULT 0;

CREATE TABLE capsule_metrics (
    capsule_id TEXT COLLATE "C" NOT NULL PRIMARY KEY REFERENCES capsules (id) ON DELETE CASCADE,
    samples    TEXT   NOT NULL,
    updated_at BIGINT NOT NULL
);
