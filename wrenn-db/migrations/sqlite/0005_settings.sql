-- Server-wide settings. `data_dir_id` pairs the database with the data directory
-- whose capsules it records (the same id is kept in <data dir>/data-dir.id).
CREATE TABLE settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
