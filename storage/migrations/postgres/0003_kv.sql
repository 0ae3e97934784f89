-- Each user's key-value map: the winning write of each key, deletions as tombstones
-- (value NULL, deleted true) until compaction forgets them.
CREATE TABLE kv (
    "user"  TEXT NOT NULL,
    key     TEXT NOT NULL,
    rev     BIGINT NOT NULL,
    hlc     BIGINT NOT NULL,
    dev     TEXT NOT NULL,
    value   BYTEA,  -- CBOR
    deleted BOOLEAN NOT NULL,
    ts      BIGINT NOT NULL,  -- server time of the write, for tombstone expiry
    PRIMARY KEY ("user", key)
);

-- A KV actor loads a user's map in revision order.
CREATE INDEX kv_by_rev ON kv ("user", rev);

-- rev: the newest revision given out (it never goes back, even when the entry holding
-- it is compacted away); floor: the newest deletion forgotten; (floor_hlc, floor_dev):
-- the greatest write among the deletions forgotten, which a write to a key with no
-- entry must beat.
CREATE TABLE kv_heads (
    "user"    TEXT PRIMARY KEY,
    rev       BIGINT NOT NULL,
    floor     BIGINT NOT NULL,
    floor_hlc BIGINT NOT NULL DEFAULT 0,
    floor_dev TEXT NOT NULL DEFAULT ''
);
