-- Fencing tokens, for a cluster of nodes sharing this database: a node that takes an
-- actor (a room, a user, a user's kv map) increments its token, and a write-behind
-- batch checks, in its own transaction, that the tokens it was written under are still
-- the newest (FOR SHARE: a claim waits for the batches already checking, and every
-- batch after it sees the new token). A stale owner's writes are refused, not ignored.
CREATE TABLE fences (
    kind  TEXT NOT NULL,
    key   TEXT NOT NULL,
    token BIGINT NOT NULL,
    PRIMARY KEY (kind, key)
);
