-- Registered hosts: an admin creates a host and gets a one-time registration token
-- (stored hashed, single use, expiring); the agent registers with it and receives a
-- certificate the control plane's host CA signs. The control plane reaches its agents
-- over mutual TLS: agents present host certificates, the control plane a certificate
-- of its own CA. Both CAs live here, their keys sealed with the server secret.
CREATE TABLE host_tokens (
    id          TEXT NOT NULL PRIMARY KEY,
    host_id     TEXT NOT NULL REFERENCES hosts (id) ON DELETE CASCADE,
    token_hash  TEXT NOT NULL UNIQUE,
    created_by  TEXT,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    used_at     INTEGER
);
CREATE INDEX host_tokens_host ON host_tokens (host_id);
ALTER TABLE hosts ADD COLUMN provider TEXT;
ALTER TABLE hosts ADD COLUMN availability_zone TEXT;
ALTER TABLE hosts ADD COLUMN created_by TEXT;
ALTER TABLE hosts ADD COLUMN cert_fingerprint TEXT;
ALTER TABLE hosts ADD COLUMN cert_expires_at INTEGER;
CREATE TABLE cluster_cas (
    name        TEXT NOT NULL PRIMARY KEY,
    cert_pem    TEXT NOT NULL,
    key_sealed  TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);
-- Hosts holding a copy of a team's snapshot template (besides the host it was taken
-- on, templates.host_id): a delete removes every copy.
CREATE TABLE template_copies (
    template_id TEXT NOT NULL REFERENCES templates (id) ON DELETE CASCADE,
    host_id     TEXT NOT NULL,
    PRIMARY KEY (template_id, host_id)
);
