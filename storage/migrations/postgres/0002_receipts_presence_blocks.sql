-- Receipt cursors: per (room, user) monotonic maxima, written as upserts that keep them.
-- The primary key serves "the cursors of a room".
CREATE TABLE receipts (
    room      TEXT NOT NULL,
    "user"    TEXT NOT NULL,
    delivered BIGINT NOT NULL,
    read      BIGINT NOT NULL,
    PRIMARY KEY (room, "user")
);

-- What presence keeps of a user: the status they chose and when they were last online.
CREATE TABLE users (
    id        TEXT PRIMARY KEY,
    status    SMALLINT NOT NULL,
    last_seen BIGINT
);

-- "user" blocks other.
CREATE TABLE blocks (
    "user"     TEXT NOT NULL,
    other      TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY ("user", other)
);

CREATE INDEX blocks_by_other ON blocks (other);
