-- A registered agent renews its certificate before it expires with a refresh token
-- (stored hashed, replaced at each use). Events of the platform rather than of a team
-- (host registrations, refused host credentials) have their own audit log.
ALTER TABLE hosts ADD COLUMN refresh_token_hash TEXT;
ALTER TABLE hosts ADD COLUMN refresh_expires_at BIGINT;
CREATE UNIQUE INDEX hosts_refresh_token ON hosts (refresh_token_hash);
CREATE TABLE platform_audit_logs (
    id            TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    actor_type    TEXT    NOT NULL CHECK (actor_type IN ('user', 'api_key', 'system')),
    actor_id      TEXT,
    actor_name    TEXT,
    action        TEXT    NOT NULL,
    resource_type TEXT    NOT NULL,
    resource_id   TEXT,
    result        TEXT    NOT NULL CHECK (result IN ('success', 'failure')),
    metadata      TEXT,
    created_at    BIGINT  NOT NULL
);
CREATE INDEX platform_audit_logs_created ON platform_audit_logs (created_at DESC, id DESC);
-- Join tokens register many hosts (the agents of a Kubernetes DaemonSet, an image
-- baked for a fleet): each registration creates a host, up to max_hosts, until the
-- token expires or is revoked (deleted).
CREATE TABLE host_join_tokens (
    id          TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    token_hash  TEXT    NOT NULL UNIQUE,
    created_by  TEXT,
    created_at  BIGINT  NOT NULL,
    expires_at  BIGINT  NOT NULL,
    max_hosts   BIGINT,
    used        BIGINT  NOT NULL DEFAULT 0
);
