"""Session tokens (JWT, HS256) and the development secrets kept beside the database."""

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import jwt
from jwt.algorithms import HMACAlgorithm

from actors.services import TOKEN_LEEWAY, Claims
from protocol.limits import is_user_id
from storage.sqlite import sqlite_path
from storage.store import StorageConfigError

ALGORITHM = "HS256"
LEEWAY_SECONDS = TOKEN_LEEWAY
DEV_SECRETS_NAME = "parley-dev.json"


def issue_token(secret: str, user: str, ttl: int) -> str:
    """A token that authenticates ``user`` for ``ttl`` seconds."""
    if not is_user_id(user):
        raise ValueError(f"bad user id {user!r}: 1-64 of A-Z a-z 0-9 _ . @ + = ~ -")
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + ttl}, secret, algorithm=ALGORITHM)


def token_subject(token: str) -> str | None:
    """The user ``token`` names, read without checking it (only the server can): for a
    client to catch a mix-up before it connects. None if it is no JWT with a subject."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return None
    subject = claims.get("sub")
    return subject if isinstance(subject, str) else None


class _PreparedHMAC(HMACAlgorithm):
    """HS256 with the secret checked and prepared once, not on every decode.

    PyJWT prepares the key for each token, and its check that an HMAC secret is not an
    asymmetric key (PEM and SSH patterns, then DER parsing through cryptography) was 10 %
    of the server's CPU per session connect (py-spy of ``bench idle``, BENCHMARKS.md
    "Idle sessions"). The check still runs: once, here."""

    def __init__(self, secret: str) -> None:
        super().__init__(HMACAlgorithm.SHA256)
        self._key = super().prepare_key(secret)

    def prepare_key(self, key: str | bytes) -> bytes:
        return self._key  # the verifier only ever passes the secret it was made with


# The header every token of issue_token has, as PyJWT writes it.
_OUR_HEADER = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=").decode("ascii")
_OUR_CLAIMS = frozenset({"sub", "iat", "exp"})


def _valid_as_issued(
    token: str, mac: "hmac.HMAC", require_exp: bool, now: float
) -> dict[str, object] | None:
    """The claims of ``token`` if it is shaped exactly as ``issue_token`` makes them
    (that header, only ``sub``, ``iat``, ``exp``, integers where PyJWT wants them) and
    valid now; else None, and PyJWT decides, with its own error.

    Why: PyJWT's decode was 12 % of the server's CPU per session connect (cProfile of a
    connect storm, BENCHMARKS.md "Connects and idle memory"); this is an HMAC and a JSON
    parse. It only ever accepts what PyJWT accepts: every check it skips, it leaves to
    PyJWT."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != _OUR_HEADER:
        return None
    try:
        signed = mac.copy()
        signed.update(f"{parts[0]}.{parts[1]}".encode("ascii"))
        signature = base64.urlsafe_b64encode(signed.digest()).rstrip(b"=")
        if not hmac.compare_digest(signature, parts[2].encode("ascii")):
            return None
        payload = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except ValueError:  # not ASCII, not base64, not JSON
        return None
    if type(claims) is not dict or not claims.keys() <= _OUR_CLAIMS:
        return None
    # PyJWT checks a claim whenever its key is there, null included.
    if "exp" in claims:
        exp = claims["exp"]
        if type(exp) is not int or exp <= now - LEEWAY_SECONDS:
            return None
    elif require_exp:
        return None
    if "iat" in claims:
        iat = claims["iat"]
        if type(iat) is not int or iat > now + LEEWAY_SECONDS:
            return None
    if type(claims.get("sub")) is not str:
        return None
    return claims


def token_verifier(secret: str, *, require_exp: bool = True) -> Callable[[str], Claims]:
    """token -> its claims; raises ValueError saying what is wrong with the token. A
    token without ``exp`` is refused unless ``require_exp`` is False."""
    decoder = jwt.PyJWT()
    required = ["sub", "exp"] if require_exp else ["sub"]
    # PyJWT keeps its signature layer private; replacing the algorithm there changes
    # nothing else of decode() (claims, leeway, errors). tests/test_tokens.py holds it.
    decoder._jws.unregister_algorithm(ALGORITHM)
    decoder._jws.register_algorithm(ALGORITHM, _PreparedHMAC(secret))

    mac = hmac.new(secret.encode("utf-8"), digestmod=hashlib.sha256)

    def verify(token: str) -> Claims:
        claims = _valid_as_issued(token, mac, require_exp, time.time())
        if claims is None:
            claims = _decode(token)
        user = claims["sub"]
        if not isinstance(user, str) or not is_user_id(user):
            raise ValueError("token subject is not a valid user id")
        exp = claims.get("exp")
        return Claims(user, None if exp is None else int(exp))  # type: ignore[call-overload]

    def _decode(token: str) -> dict[str, object]:
        try:
            return decoder.decode(
                token,
                secret,
                algorithms=[ALGORITHM],
                leeway=LEEWAY_SECONDS,
                options={"require": required},
            )
        except jwt.ExpiredSignatureError:
            raise ValueError("token expired") from None
        except jwt.MissingRequiredClaimError as exc:
            if exc.claim == "exp":
                raise ValueError("token has no expiry (exp); this server requires one") from None
            raise ValueError(str(exc)) from None
        except jwt.InvalidTokenError as exc:
            raise ValueError(str(exc) or type(exc).__name__) from None

    return verify


@attrs.frozen
class DevSecrets:
    secret: str
    admin_token: str
    path: Path
    created: bool


def dev_secrets_path(database_url: str) -> Path:
    """Beside the SQLite file; in the working directory for other databases."""
    try:
        return sqlite_path(database_url).parent / DEV_SECRETS_NAME
    except StorageConfigError:  # not SQLite: no file to sit beside
        return Path(DEV_SECRETS_NAME)


def load_dev_secrets(path: Path, *, create: bool) -> DevSecrets | None:
    """Read the development secrets, generating them first if ``create``."""
    if path.exists():
        data = json.loads(path.read_text("utf-8"))
        return DevSecrets(data["secret"], data["admin_token"], path, created=False)
    if not create:
        return None
    data = {"secret": secrets.token_urlsafe(32), "admin_token": secrets.token_urlsafe(24)}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f)
    return DevSecrets(data["secret"], data["admin_token"], path, created=True)
