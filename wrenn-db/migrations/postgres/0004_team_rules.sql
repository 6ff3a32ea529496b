-- Team rules and invitations. Keep in step with ../sqlite/.
--
-- One owner per team. Earlier releases let an owner hand the role to a second member
-- without giving it up, or leave a team without an owner: keep the earliest owner and
-- make the others admins, and give a team that has members but no owner one (its
-- earliest admin, else its earliest member) before the index makes it a rule.
UPDATE memberships SET role = 'admin'
WHERE role = 'owner' AND EXISTS (
    SELECT 1 FROM memberships o
    WHERE o.team_id = memberships.team_id AND o.role = 'owner'
      AND (o.created_at < memberships.created_at
           OR (o.created_at = memberships.created_at AND o.user_id < memberships.user_id)));
UPDATE memberships SET role = 'owner'
WHERE NOT EXISTS (
    SELECT 1 FROM memberships o WHERE o.team_id = memberships.team_id AND o.role = 'owner')
  AND NOT EXISTS (
    SELECT 1 FROM memberships e
    WHERE e.team_id = memberships.team_id AND e.user_id <> memberships.user_id
      AND ((CASE WHEN e.role = 'admin' THEN 0 ELSE 1 END)
               < (CASE WHEN memberships.role = 'admin' THEN 0 ELSE 1 END)
           OR ((CASE WHEN e.role = 'admin' THEN 0 ELSE 1 END)
                   = (CASE WHEN memberships.role = 'admin' THEN 0 ELSE 1 END)
               AND (e.created_at < memberships.created_at
                    OR (e.created_at = memberships.created_at AND e.user_id < memberships.user_id)))));
CREATE UNIQUE INDEX memberships_one_owner ON memberships (team_id) WHERE role = 'owner';

-- An invitation lets one e-mail address sign up (also while sign-up is closed) and join
-- the team with the role it names. The token is shown once; only its SHA-256 is kept.
CREATE TABLE invitations (
    id         TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    team_id    TEXT COLLATE "C" NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    email      TEXT    NOT NULL,
    role       TEXT    NOT NULL CHECK (role IN ('admin', 'member')),
    token_hash TEXT    NOT NULL UNIQUE,
    created_by TEXT COLLATE "C" REFERENCES users (id) ON DELETE SET NULL,
    created_at BIGINT  NOT NULL,
    expires_at BIGINT  NOT NULL
);
CREATE INDEX invitations_team ON invitations (team_id, created_at);
