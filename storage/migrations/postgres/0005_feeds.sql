-- Feed posts. id is number * 16384 + shard (actors/feed_cells.py); the shard is kept
-- as a column too, for the index a shard loads its recent posts by.
CREATE TABLE posts (
    id         BIGINT PRIMARY KEY,
    shard      INTEGER NOT NULL,
    author     TEXT NOT NULL,
    cid        TEXT NOT NULL,
    ts         BIGINT NOT NULL,
    lat        DOUBLE PRECISION NOT NULL,
    lon        DOUBLE PRECISION NOT NULL,
    category   TEXT NOT NULL,
    text       TEXT,
    data       BYTEA,  -- CBOR
    deleted_at BIGINT,  -- a deleted post keeps its row (and its id), marked
    UNIQUE (author, cid)
);

-- Deleted posts are in no feed: the index leaves them out.
CREATE INDEX posts_live_by_shard ON posts (shard, ts) WHERE deleted_at IS NULL;

-- The highest post number each shard gave out, so that a restarted shard never gives
-- an id out again, even one of a post deleted or too old to load.
CREATE TABLE feed_shards (
    shard       INTEGER PRIMARY KEY,
    last_number BIGINT NOT NULL
);

CREATE TABLE likes (
    post   BIGINT NOT NULL,
    "user" TEXT NOT NULL,
    shard  INTEGER NOT NULL,
    ts     BIGINT NOT NULL,
    PRIMARY KEY (post, "user")
);

-- A shard loads the likers of its posts in one range, from its oldest loaded post on
-- (an index-only scan).
CREATE INDEX likes_by_shard ON likes (shard, post, "user");

-- "user" follows author.
CREATE TABLE follows (
    "user" TEXT NOT NULL,
    author TEXT NOT NULL,
    ts     BIGINT NOT NULL,
    PRIMARY KEY ("user", author)
);

CREATE TABLE interests (
    "user"   TEXT NOT NULL,
    category TEXT NOT NULL,
    PRIMARY KEY ("user", category)
);
