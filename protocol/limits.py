"""Size limits and identifier rules the codec enforces.

Limits are configuration (``parley serve --help``); the server announces them in
``welcome`` so a client can check before it sends.
"""

import re

import attrs

# User ids never contain ':' so that a direct room's id, "dm:<a>:<b>", is unambiguous.
USER_ID_RE = re.compile(r"[A-Za-z0-9_.@+=~-]{1,64}")
ROOM_ID_RE = re.compile(r"[A-Za-z0-9_.@+=~:-]{1,128}")
DIRECT_PREFIX = "dm:"
MAX_CID_CHARS = 64
MAX_EPOCH_CHARS = 32
MAX_DATA_DEPTH = 8
MAX_UINT = 2**53 - 1  # the largest integer every JavaScript client reads exactly
ROOM_PAGE = 100  # rooms in a roomlist when the request names no limit
MAX_ROOM_PAGE = 500
MAX_RECEIPT_RANGE = 100  # seqs in one receipts-count answer
MAX_CURSORS = 1000  # member cursors in one receiptstate answer
MAX_USERS_PER_REQUEST = 100  # users named in one who, watch or unwatch
KV_PAGE = 500  # entries in a kvchanges page when the request names no limit
MAX_KV_PAGE = 1000
FEED_PAGE = 20  # items in a feed page when the request names no limit
MAX_FEED_PAGE = 100
MAX_FEED_DEPTH = 500  # ranks a view's snapshot holds: feedmore reads no further
MAX_INTERESTS = 32  # categories in one interests frame
MIN_RADIUS_M = 100
MAX_RADIUS_M = 100_000  # a feed is local: a view asks at most a few shards
MAX_VIEWS = 4  # feed views open at once in one session
MAX_CATEGORY_CHARS = 32
POST_PREFIX = "post:"  # the comment room of post 123 is "post:123"


CATEGORIES = (
    "art",
    "events",
    "food",
    "music",
    "news",
    "other",
    "places",
    "sports",
    "tech",
    "travel",
)


@attrs.frozen(kw_only=True)
class Limits:
    """What one client may send."""

    max_frame_bytes: int = 65536
    max_text_chars: int = 4096
    max_data_bytes: int = 8192
    max_rooms_per_session: int = 100
    max_history_limit: int = 100
    default_history_limit: int = 50
    kv_key_bytes: int = 256  # UTF-8 bytes of a kv key
    kv_value_bytes: int = 16384  # CBOR bytes of a kv value
    kv_batch: int = 500  # writes in one kvput
    categories: tuple[str, ...] = CATEGORIES  # of feed posts and interests

    def announce(self) -> dict[str, int]:
        """The ``limits`` map of ``welcome``."""
        return {
            "frame": self.max_frame_bytes,
            "text": self.max_text_chars,
            "data": self.max_data_bytes,
            "rooms": self.max_rooms_per_session,
            "history": self.max_history_limit,
            "kvkey": self.kv_key_bytes,
            "kvvalue": self.kv_value_bytes,
            "kvbatch": self.kv_batch,
        }


def is_device_id(value: str) -> bool:
    """Device ids follow the user id rules (a UUID fits)."""
    return USER_ID_RE.fullmatch(value) is not None


def is_user_id(value: str) -> bool:
    return USER_ID_RE.fullmatch(value) is not None


def is_room_id(value: str) -> bool:
    """A room a client may name; direct rooms are named by the server only."""
    return ROOM_ID_RE.fullmatch(value) is not None


def direct_room_id(a: str, b: str) -> str:
    """The one room id shared by users ``a`` and ``b``, whoever asks."""
    low, high = sorted((a, b))
    return f"{DIRECT_PREFIX}{low}:{high}"


def direct_room_users(room: str) -> tuple[str, str] | None:
    """The two users of a direct room id, or None if ``room`` is not one."""
    if not room.startswith(DIRECT_PREFIX):
        return None
    parts = room[len(DIRECT_PREFIX) :].split(":")
    if len(parts) != 2 or not all(is_user_id(p) for p in parts) or parts[0] >= parts[1]:
        return None
    return parts[0], parts[1]
