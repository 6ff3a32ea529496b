-- Template builds requested in two phases (E2B's template builder): the request names
-- the template and its size and gets the build's id; files are uploaded next, by the
-- hash the client gives them; then the steps arrive and the build is queued. Uploads
-- are the team's, so a later build with the same files does not send them again.
CREATE TABLE template_build_requests (
    id         TEXT    NOT NULL PRIMARY KEY,
    team_id    TEXT    NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    name       TEXT    NOT NULL,
    vcpus      INTEGER NOT NULL,
    memory_mb  INTEGER NOT NULL,
    created_by TEXT,
    created_at INTEGER NOT NULL
);
CREATE INDEX template_build_requests_created ON template_build_requests (created_at);
CREATE TABLE template_uploads (
    team_id    TEXT    NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    hash       TEXT    NOT NULL,
    path       TEXT    NOT NULL,
    mode       INTEGER NOT NULL,
    data       BLOB    NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (team_id, hash, path)
);
CREATE INDEX template_uploads_created ON template_uploads (created_at);
