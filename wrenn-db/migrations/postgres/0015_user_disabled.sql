-- A platform admin may disable an account: it cannot log in and its tokens stop
-- working; its teams and their keys stay.
ALTER TABLE users ADD COLUMN disabled_at BIGINT;
