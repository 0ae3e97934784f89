-- Rooms, their members and their messages (the same schema as SQLite's, in PostgreSQL
-- types; "user" is quoted because it is a reserved word here).
-- dirty_run: the run (node start) that last activated the room. A clean stop clears
-- it; a room still dirty at the next start was written by a crashed run, which may
-- have delivered messages it never stored, so it gets a new epoch.
CREATE TABLE rooms (
    id         TEXT PRIMARY KEY,
    kind       SMALLINT NOT NULL,
    owner      TEXT,
    epoch      TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    dirty_run  BIGINT
);

CREATE INDEX rooms_dirty ON rooms (dirty_run) WHERE dirty_run IS NOT NULL;

CREATE TABLE members (
    room     TEXT NOT NULL,
    "user"   TEXT NOT NULL,
    added_at BIGINT NOT NULL,
    PRIMARY KEY (room, "user")
);

CREATE INDEX members_by_user ON members ("user", room);

-- History reads by (room, seq) ranges: the primary key serves them. Not partitioned:
-- see ARCHITECTURE.md ("PostgreSQL").
CREATE TABLE messages (
    room   TEXT NOT NULL,
    seq    BIGINT NOT NULL,
    ts     BIGINT NOT NULL,
    sender TEXT,
    cid    TEXT NOT NULL,
    text   TEXT,
    data   BYTEA,
    PRIMARY KEY (room, seq)
);

-- Not UNIQUE: deduplication is the room's job (its window plus lookups for retries);
-- a constraint the room could violate would wedge the write-behind queue.
CREATE INDEX messages_by_cid ON messages (room, sender, cid);

CREATE TABLE runs (
    id         BIGSERIAL PRIMARY KEY,
    started_at BIGINT NOT NULL,
    stopped_at BIGINT
);
