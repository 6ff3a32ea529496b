-- A capsule's egress policy (JSON: allow_out, deny_out, dns_servers; '{}' = open),
-- whether its ports are public through the proxy ('on') or need the traffic access
-- token ('off'), and that token, sealed like the envd token.
ALTER TABLE capsules ADD COLUMN network TEXT NOT NULL DEFAULT '{}';
ALTER TABLE capsules ADD COLUMN public_traffic TEXT NOT NULL DEFAULT 'on' CHECK (public_traffic IN ('on', 'off'));
ALTER TABLE capsules ADD COLUMN traffic_access_token TEXT;
