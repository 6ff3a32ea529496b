-- Notification channels: where a team's lifecycle events are sent (a webhook, or a chat
-- service's incoming webhook). The provider's settings (URLs, secrets) are sealed by the
-- server before they are stored. Deliveries are the outbox: one row per event and
-- channel, sent and retried by any server's dispatcher, with what happened to it.
CREATE TABLE channels (
    id          TEXT    NOT NULL PRIMARY KEY,
    team_id     TEXT    NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    name        TEXT    NOT NULL,
    provider    TEXT    NOT NULL,
    config      TEXT    NOT NULL,
    event_types TEXT    NOT NULL,
    created_by  TEXT,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    UNIQUE (team_id, name)
);
CREATE TABLE channel_deliveries (
    id           TEXT    NOT NULL PRIMARY KEY,
    channel_id   TEXT    NOT NULL REFERENCES channels (id) ON DELETE CASCADE,
    team_id      TEXT    NOT NULL,
    event_type   TEXT    NOT NULL,
    payload      TEXT    NOT NULL,
    status       TEXT    NOT NULL,
    attempts     INTEGER NOT NULL,
    last_error   TEXT,
    last_status  INTEGER,
    next_at      INTEGER NOT NULL,
    lease_until  INTEGER,
    created_at   INTEGER NOT NULL,
    delivered_at INTEGER
);
CREATE INDEX channel_deliveries_due ON channel_deliveries (status, next_at);
CREATE INDEX channel_deliveries_channel ON channel_deliveries (channel_id, created_at);
