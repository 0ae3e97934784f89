-- Rooms, their members and their messages.
-- dirty_run: the run (node start) that last activated the room. A clean stop clears
-- it; a room still dirty at the next start was written by a crashed run, which may
-- have delivered messages it never stored, so it gets a new epoch.
CREATE TABLE rooms (
    id         TEXT PRIMARY KEY,
    kind       INTEGER NOT NULL,
    owner      TEXT,
    epoch      TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    dirty_run  INTEGER
) WITHOUT ROWID;

CREATE INDEX rooms_dirty ON rooms (dirty_run) WHERE dirty_run IS NOT NULL;

CREATE TABLE members (
    room     TEXT NOT NULL,
    user     TEXT NOT NULL,
    added_at INTEGER NOT NULL,
    PRIMARY KEY (room, user)
) WITHOUT ROWID;

CREATE INDEX members_by_user ON members (user);

-- sender is NULL for messages the server published through the admin API.
CREATE TABLE messages (
    room   TEXT NOT NULL,
    seq    INTEGER NOT NULL,
    ts     INTEGER NOT NULL,
    sender TEXT,
    cid    TEXT NOT NULL,
    text   TEXT,
    data   BLOB,
    PRIMARY KEY (room, seq)
) WITHOUT ROWID;

-- Not UNIQUE: deduplication is the room's job (its window plus lookups for retries);
-- a constraint the room could violate would wedge the write-behind queue.
CREATE INDEX messages_by_cid ON messages (room, sender, cid);

CREATE TABLE runs (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at INTEGER NOT NULL,
    stopped_at INTEGER
);
