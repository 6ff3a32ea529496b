-- Wrenn control-plane state, PostgreSQL flavour. Keep in step with ../sqlite/.
-- Timestamps are BIGINT microseconds since the Unix epoch (UTC) and JSON is TEXT, as in
-- SQLite, so that one set of queries serves both (sqlx's Any driver has no timestamp or
-- JSON types). Text keys use the "C" collation: keyset pagination compares ids bytewise.
-- Ids are the public prefixed form (`usr-…`, `team-…`, `cl-…`).

CREATE TABLE users (
    id            TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    email         TEXT    NOT NULL UNIQUE,
    name          TEXT    NOT NULL,
    password_hash TEXT,
    is_admin      BOOLEAN NOT NULL DEFAULT FALSE,
    created_at    BIGINT  NOT NULL,
    updated_at    BIGINT  NOT NULL
);

CREATE TABLE teams (
    id         TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    name       TEXT    NOT NULL,
    slug       TEXT    NOT NULL UNIQUE,
    created_at BIGINT  NOT NULL
);

CREATE TABLE memberships (
    team_id    TEXT COLLATE "C" NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    user_id    TEXT COLLATE "C" NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role       TEXT    NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    is_default BOOLEAN NOT NULL DEFAULT FALSE,
    created_at BIGINT  NOT NULL,
    PRIMARY KEY (team_id, user_id)
);
CREATE INDEX memberships_user ON memberships (user_id);

CREATE TABLE api_keys (
    id         TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    team_id    TEXT COLLATE "C" NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    name       TEXT    NOT NULL,
    key_hash   TEXT    NOT NULL UNIQUE,
    key_prefix TEXT    NOT NULL,
    created_by TEXT COLLATE "C" REFERENCES users (id) ON DELETE SET NULL,
    created_at BIGINT  NOT NULL,
    last_used  BIGINT
);
CREATE INDEX api_keys_team ON api_keys (team_id, created_at);

CREATE TABLE capsules (
    id                TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    team_id           TEXT COLLATE "C" NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    status            TEXT    NOT NULL,
    template          TEXT    NOT NULL,
    vcpus             BIGINT  NOT NULL,
    memory_mb         BIGINT  NOT NULL,
    timeout_sec       BIGINT  NOT NULL DEFAULT 300,
    created_at        BIGINT  NOT NULL,
    started_at        BIGINT,
    last_active_at    BIGINT,
    last_updated      BIGINT  NOT NULL,
    metadata          TEXT    NOT NULL DEFAULT '{}',
    envd_access_token TEXT
);
CREATE INDEX capsules_team ON capsules (team_id, created_at);
CREATE INDEX capsules_status ON capsules (status);

CREATE TABLE templates (
    id             TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    team_id        TEXT COLLATE "C" NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    name           TEXT    NOT NULL,
    kind           TEXT    NOT NULL CHECK (kind IN ('base', 'snapshot')),
    source_capsule TEXT,
    vcpus          BIGINT,
    memory_mb      BIGINT,
    size_bytes     BIGINT  NOT NULL DEFAULT 0,
    metadata       TEXT    NOT NULL DEFAULT '{}',
    created_at     BIGINT  NOT NULL,
    UNIQUE (team_id, name)
);

CREATE TABLE audit_logs (
    id            TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    team_id       TEXT COLLATE "C" NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
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
CREATE INDEX audit_logs_team_created ON audit_logs (team_id, created_at DESC, id DESC);
