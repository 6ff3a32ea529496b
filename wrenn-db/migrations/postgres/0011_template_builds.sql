-- Template builds: a recipe run in a capsule whose result becomes a team template.
-- Steps are kept as written (one instruction per line, JSON array); logs are lines
-- numbered per build so a reader can follow from where it stopped; the files a recipe
-- copies are uploaded with the build and kept until it ends.
CREATE TABLE template_builds (
    id             TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    team_id        TEXT    NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    name           TEXT    NOT NULL,
    base_template  TEXT    NOT NULL,
    recipe         TEXT    NOT NULL,
    healthcheck    TEXT,
    vcpus          BIGINT NOT NULL,
    memory_mb      BIGINT NOT NULL,
    skip_pre_post  BIGINT NOT NULL DEFAULT 0,
    timeout_sec    BIGINT NOT NULL,
    status         TEXT    NOT NULL CHECK (status IN ('pending', 'running', 'success', 'failed', 'cancelled')),
    current_step   BIGINT NOT NULL DEFAULT 0,
    total_steps    BIGINT NOT NULL,
    error          TEXT,
    capsule_id     TEXT,
    host_id        TEXT,
    template_id    TEXT,
    default_user   TEXT,
    default_env    TEXT,
    metadata       TEXT,
    created_by     TEXT,
    created_at     BIGINT NOT NULL,
    started_at     BIGINT,
    completed_at   BIGINT,
    cancel_requested BIGINT NOT NULL DEFAULT 0,
    -- The worker running it touches this; a running build whose worker went silent
    -- (its server was killed) is failed and cleaned by another.
    heartbeat_at   BIGINT
);
CREATE INDEX template_builds_team ON template_builds (team_id, created_at DESC, id DESC);
CREATE INDEX template_builds_status ON template_builds (status, created_at);
CREATE TABLE template_build_logs (
    build_id   TEXT COLLATE "C" NOT NULL REFERENCES template_builds (id) ON DELETE CASCADE,
    seq        BIGINT NOT NULL,
    step       BIGINT NOT NULL,
    stream     TEXT    NOT NULL CHECK (stream IN ('stdout', 'stderr', 'system')),
    line       TEXT    NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (build_id, seq)
);
CREATE TABLE template_build_files (
    build_id   TEXT COLLATE "C" NOT NULL REFERENCES template_builds (id) ON DELETE CASCADE,
    path       TEXT    NOT NULL,
    mode       BIGINT NOT NULL,
    data       BYTEA NOT NULL,
    PRIMARY KEY (build_id, path)
);
