-- Wrenn control-plane state, SQLite flavour. Keep in step with ../postgres/.
-- Timestamps are INTEGER microseconds since the Unix epoch (UTC), JSON is TEXT, and
-- booleans are INTEGER 0/1 (sqlx's Any driver cannot read SQLite BOOLEAN columns). Ids are the public prefixed form (`usr-…`, `team-…`, `cl-…`).

CREATE TABLE users (
    id            TEXT    NOT NULL PRIMARY KEY,
    email         TEXT    NOT NULL UNIQUE,
    name          TEXT    NOT NULL,
    password_hash TEXT,
    is_admin      INTEGER NOT NULL DEFAULT 0 CHECK (is_admin IN (0, 1)),
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);

CREATE TABLE teams (
    id         TEXT    NOT NULL PRIMARY KEY,
    name       TEXT    NOT NULL,
    slug       TEXT    NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
);

CREATE TABLE memberships (
    team_id    TEXT    NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    user_id    TEXT    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role       TEXT    NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    is_default INTEGER NOT NULL DEFAULT 0 CHECK (is_default IN (0, 1)),
    created_at INTEGER NOT NULL,
    PRIMARY KEY (team_id, user_id)
);
CREATE INDEX memberships_user ON memberships (user_id);

CREATE TABLE api_keys (
    id         TEXT    NOT NULL PRIMARY KEY,
    team_id    TEXT    NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    name       TEXT    NOT NULL,
    key_hash   TEXT    NOT NULL UNIQUE,
    key_prefix TEXT    NOT NULL,
    created_by TEXT    REFERENCES users (id) ON DELETE SET NULL,
    created_at INTEGER NOT NULL,
    last_used  INTEGER
);
CREATE INDEX api_keys_team ON api_keys (team_id, created_at);

CREATE TABLE capsules (
    id                TEXT    NOT NULL PRIMARY KEY,
    team_id           TEXT    NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    status            TEXT    NOT NULL,
    template          TEXT    NOT NULL,
    vcpus             INTEGER NOT NULL,
    memory_mb         INTEGER NOT NULL,
    timeout_sec       INTEGER NOT NULL DEFAULT 300,
    created_at        INTEGER NOT NULL,
    started_at        INTEGER,
    last_active_at    INTEGER,
    last_updated      INTEGER NOT NULL,
    metadata          TEXT    NOT NULL DEFAULT '{}',
    envd_access_token TEXT
);
CREATE INDEX capsules_team ON capsules (team_id, created_at);
CREATE INDEX capsules_status ON capsules (status);

CREATE TABLE templates (
    id             TEXT    NOT NULL PRIMARY KEY,
    team_id        TEXT    NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    name           TEXT    NOT NULL,
    kind           TEXT    NOT NULL CHECK (kind IN ('base', 'snapshot')),
    source_capsule TEXT,
    vcpus          INTEGER,
    memory_mb      INTEGER,
    size_bytes     INTEGER NOT NULL DEFAULT 0,
    metadata       TEXT    NOT NULL DEFAULT '{}',
    created_at     INTEGER NOT NULL,
    UNIQUE (team_id, name)
);

CREATE TABLE audit_logs (
    id            TEXT    NOT NULL PRIMARY KEY,
    team_id       TEXT    NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    actor_type    TEXT    NOT NULL CHECK (actor_type IN ('user', 'api_key', 'system')),
    actor_id      TEXT,
    actor_name    TEXT,
    action        TEXT    NOT NULL,
    resource_type TEXT    NOT NULL,
    resource_id   TEXT,
    result        TEXT    NOT NULL CHECK (result IN ('success', 'failure')),
    metadata      TEXT,
    created_at    INTEGER NOT NULL
);
CREATE INDEX audit_logs_team_created ON audit_logs (team_id, created_at DESC, id DESC);
