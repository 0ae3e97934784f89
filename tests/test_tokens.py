"""server/tokens.py: the verifier with its HMAC key prepared once gives PyJWT's own
verdict on any token."""

import time

import jwt
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from protocol.limits import is_user_id
from server.tokens import ALGORITHM, LEEWAY_SECONDS, issue_token, token_verifier

SECRET = "test-secret-0123456789-abcdefghijklmnop"


def reference(token: str, *, require_exp: bool = True) -> str:
    """PyJWT as it comes, with the options the server uses."""
    try:
        claims = jwt.decode(
            token,
            SECRET,
            algorithms=[ALGORITHM],
            leeway=LEEWAY_SECONDS,
            options={"require": ["sub", "exp"] if require_exp else ["sub"]},
        )
    except jwt.ExpiredSignatureError:
        return "error: token expired"
    except jwt.MissingRequiredClaimError as exc:
        if exc.claim == "exp":
            return "error: token has no expiry (exp); this server requires one"
        return f"error: {exc}"
    except jwt.InvalidTokenError as exc:
        return f"error: {exc or type(exc).__name__}"
    if not isinstance(claims["sub"], str) or not is_user_id(claims["sub"]):
        return "error: token subject is not a valid user id"  # the server's own rule
    exp = claims.get("exp")
    return f"{claims['sub']} until {None if exp is None else int(exp)}"


def ours(token: str, *, require_exp: bool = True) -> str:
    try:
        claims = token_verifier(SECRET, require_exp=require_exp)(token)
    except ValueError as exc:
        return f"error: {exc}"
    return f"{claims.user} until {claims.exp}"


def test_same_verdicts_as_pyjwt() -> None:
    now = int(time.time())
    sign = jwt.encode
    tokens = [
        issue_token(SECRET, "alice", 3600),
        issue_token("another-secret-0123456789-abcdefghijklmnopqrstuvwxyz", "alice", 3600),
        sign({"sub": "alice", "exp": now - 3600}, SECRET, algorithm="HS256"),
        sign({"sub": "alice", "exp": now - 10}, SECRET, algorithm="HS256"),  # in the leeway
        sign({"sub": "alice", "exp": now + 60}, SECRET * 2, algorithm="HS512"),
        sign({"sub": "alice"}, None, algorithm="none"),
        sign({"exp": now + 60}, SECRET, algorithm="HS256"),
        sign({"sub": "alice", "nbf": now + 3600}, SECRET, algorithm="HS256"),
        sign({"sub": "alice", "aud": "elsewhere"}, SECRET, algorithm="HS256"),
        sign({"sub": "alice", "iat": "yesterday"}, SECRET, algorithm="HS256"),
        "not-a-jwt",
        "a.b.c",
    ]
    for require_exp in (True, False):
        verdicts = [ours(token, require_exp=require_exp) for token in tokens]
        assert verdicts == [reference(token, require_exp=require_exp) for token in tokens]
        assert verdicts[0].startswith("alice until ")
        assert verdicts[3] == f"alice until {now - 10}"
        assert sum(not v.startswith("error: ") for v in verdicts) == 2


def test_a_token_without_expiry_is_refused_unless_allowed() -> None:
    token = jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256")
    assert ours(token) == "error: token has no expiry (exp); this server requires one"
    assert ours(token, require_exp=False) == "alice until None"


def test_a_subject_that_is_no_user_id_is_refused() -> None:
    claims = {"sub": "no spaces allowed", "exp": int(time.time()) + 60}
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    with pytest.raises(ValueError, match="not a valid user id"):
        token_verifier(SECRET)(token)


def test_an_asymmetric_key_is_refused_as_a_secret_at_once() -> None:
    pem = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYI\n-----END PUBLIC KEY-----"
    with pytest.raises(jwt.InvalidKeyError):
        token_verifier(pem)


def test_the_servers_own_tokens_take_the_fast_path() -> None:
    import hashlib
    import hmac

    from server.tokens import _valid_as_issued

    mac = hmac.new(SECRET.encode(), digestmod=hashlib.sha256)
    token = issue_token(SECRET, "alice", 3600)
    claims = _valid_as_issued(token, mac, True, time.time())
    assert claims is not None and claims["sub"] == "alice"
    # Anything else is PyJWT's to judge: a wrong key, another header, an extra claim.
    other = hmac.new(b"another secret", digestmod=hashlib.sha256)
    assert _valid_as_issued(token, other, True, time.time()) is None
    extra = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60, "x": 1}, SECRET, "HS256")
    assert _valid_as_issued(extra, mac, True, time.time()) is None


claim_values = st.one_of(
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.text(max_size=8),
    st.none(),
)
NOW = int(time.time())
# Around now and the leeway, where the fast path's own checks decide.
times = st.one_of(
    st.integers(NOW - 2 * LEEWAY_SECONDS - 5, NOW + 2 * LEEWAY_SECONDS + 5),
    st.integers(NOW - 7200, NOW + 7200),
    claim_values,
)
# Claims shaped like issue_token's, most of them valid: the fast path's accept branch.
ours_shaped = st.fixed_dictionaries(
    {"sub": st.sampled_from(["alice", "bob.b", "alice", "", "no spaces"])},
    optional={"iat": times, "exp": times},
)


@settings(max_examples=500, deadline=None)
@given(
    claims=st.one_of(
        ours_shaped,
        ours_shaped,
        ours_shaped,
        st.dictionaries(
            st.sampled_from(["sub", "iat", "exp", "nbf", "aud", "x"]), claim_values, max_size=4
        ),
    ),
    key=st.sampled_from([SECRET, SECRET, SECRET, SECRET + "x"]),
    tamper=st.sampled_from(["none"] * 6 + ["payload", "signature", "header", "not ascii"]),
    require_exp=st.booleans(),
)
def test_same_verdicts_as_pyjwt_for_any_claims(
    claims: dict[str, object], key: str, tamper: str, require_exp: bool
) -> None:
    token = jwt.encode(claims, key, algorithm="HS256")
    head, payload, signature = token.split(".")
    if tamper == "payload":
        token = f"{head}.{payload}A.{signature}"
    elif tamper == "signature":
        token = f"{head}.{payload}.{signature[:-2]}AA"
    elif tamper == "header":
        token = jwt.encode(claims, key, algorithm="HS256", headers={"kid": "1"})
    elif tamper == "not ascii":
        token = f"{head}.{payload}.{signature[:-1]}é"
    verdict = ours(token, require_exp=require_exp)
    event("accepted" if not verdict.startswith("error: ") else "refused")
    assert verdict == reference(token, require_exp=require_exp)
