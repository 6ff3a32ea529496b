-- Team load sampled every 10 s (running capsules; vCPUs of running ones; memory of
-- running ones plus half of paused ones'), kept 60 days, and the daily usage rolled up
-- from it (a sample stands for 10 s: reserved × 10/60 minutes).
CREATE TABLE team_samples (
    team_id            TEXT    NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    sampled_at         BIGINT NOT NULL,
    running_count      BIGINT NOT NULL,
    vcpus_reserved     BIGINT NOT NULL,
    memory_mb_reserved BIGINT NOT NULL,
    PRIMARY KEY (team_id, sampled_at)
);
CREATE INDEX team_samples_at ON team_samples (sampled_at);
CREATE TABLE daily_usage (
    team_id        TEXT NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    day            TEXT NOT NULL,
    cpu_minutes    DOUBLE PRECISION NOT NULL,
    ram_mb_minutes DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (team_id, day)
);
