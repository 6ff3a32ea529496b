-- The hosts that run capsules: the in-process host of `wrenn serve` ('local') and host
-- agents. Capsules name the host that runs or holds them, snapshot templates the host
-- that holds their files.
CREATE TABLE hosts (
    id                TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    type              TEXT    NOT NULL DEFAULT 'regular' CHECK (type IN ('regular', 'byoc')),
    team_id           TEXT COLLATE "C" REFERENCES teams (id) ON DELETE CASCADE,
    address           TEXT,
    arch              TEXT,
    cpu_cores         BIGINT,
    memory_mb         BIGINT,
    disk_gb           BIGINT,
    status            TEXT    NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'online', 'offline', 'draining', 'unreachable')),
    last_heartbeat_at BIGINT,
    metadata          TEXT    NOT NULL DEFAULT '{}',
    created_at        BIGINT  NOT NULL,
    updated_at        BIGINT  NOT NULL
);
CREATE TABLE host_tags (
    host_id TEXT COLLATE "C" NOT NULL REFERENCES hosts (id) ON DELETE CASCADE,
    tag     TEXT    NOT NULL,
    PRIMARY KEY (host_id, tag)
);
ALTER TABLE capsules ADD COLUMN host_id TEXT COLLATE "C" NOT NULL DEFAULT 'local';
CREATE INDEX capsules_host ON capsules (host_id);
ALTER TABLE templates ADD COLUMN host_id TEXT COLLATE "C";
