-- Each user's key-value map: the winning write of each key, deletions as tombstones
-- (value NULL, deleted 1) until compaction forgets them.
CREATE TABLE kv (
    user    TEXT NOT NULL,
    key     TEXT NOT NULL,
    rev     INTEGER NOT NULL,
    hlc     INTEGER NOT NULL,
    dev     TEXT NOT NULL,
    value   BLOB,  -- CBOR
    deleted INTEGER NOT NULL,
    ts      INTEGER NOT NULL,  -- server time of the write, for tombstone expiry
    PRIMARY KEY (user, key)
) WITHOUT ROWID;

-- rev: the newest revision given out (it never goes back, even when the entry holding
-- it is compacted away); floor: the newest deletion forgotten; (floor_hlc, floor_dev):
-- the greatest write among the deletions forgotten, which a write to a key with no
-- entry must beat.
CREATE TABLE kv_heads (
    user      TEXT PRIMARY KEY,
    rev       INTEGER NOT NULL,
    floor     INTEGER NOT NULL,
    floor_hlc INTEGER NOT NULL DEFAULT 0,
    floor_dev TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID;
