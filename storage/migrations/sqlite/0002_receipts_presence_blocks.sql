-- Receipt cursors: per (room, user) monotonic maxima, written as upserts that keep them.
CREATE TABLE receipts (
    room      TEXT NOT NULL,
    user      TEXT NOT NULL,
    delivered INTEGER NOT NULL,
    read      INTEGER NOT NULL,
    PRIMARY KEY (room, user)
) WITHOUT ROWID;

-- What presence keeps of a user: the status they chose and when they were last online.
CREATE TABLE users (
    id        TEXT PRIMARY KEY,
    status    INTEGER NOT NULL,
    last_seen INTEGER
) WITHOUT ROWID;

-- user blocks other.
CREATE TABLE blocks (
    user       TEXT NOT NULL,
    other      TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (user, other)
) WITHOUT ROWID;

CREATE INDEX blocks_by_other ON blocks (other);
