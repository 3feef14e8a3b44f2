"""Token rules against real keys: every algorithm we accept, and the attacks we must refuse."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, hmac, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from edge.errors import Forbidden, Unauthorized
from edge.tokens import (
    DEFAULT_AUDIENCE,
    Claims,
    KeyLoadError,
    Scope,
    TokenSettings,
    TokenVerifier,
    bearer_token,
    issue_token,
)

SECRET = "a-test-secret-that-is-long-enough-for-hs256"


@dataclass(frozen=True)
class KeyPair:
    algorithm: str
    private_pem: str
    public_pem: str
    public_jwk: dict


def _key_pair(algorithm: str, private_key) -> KeyPair:
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public_pem = (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    algorithm_class = jwt.get_algorithm_by_name(algorithm)
    public_jwk = json.loads(algorithm_class.to_jwk(private_key.public_key()))
    return KeyPair(algorithm, private_pem, public_pem, public_jwk)


@pytest.fixture(scope="module")
def rsa_keys() -> KeyPair:
    return _key_pair("RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="module")
def ec_keys() -> KeyPair:
    return _key_pair("ES256", ec.generate_private_key(ec.SECP256R1()))


@pytest.fixture(scope="module")
def ed_keys() -> KeyPair:
    return _key_pair("EdDSA", ed25519.Ed25519PrivateKey.generate())


@pytest.fixture(scope="module")
def other_rsa_keys() -> KeyPair:
    return _key_pair("RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hand_signed_hs256(header: dict, payload: dict, key: bytes) -> str:
    """An HS256 token built without pyjwt, which refuses PEM-looking HMAC keys."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    mac = hmac.HMAC(key, hashes.SHA256())
    mac.update(signing_input.encode())
    return f"{signing_input}.{_b64(mac.finalize())}"


def _hand_signed_rs256(header: dict, payload: dict, private_pem: str) -> str:
    """An RS256 token with a header pyjwt would refuse to write (e.g. a non-string kid)."""
    private_key = serialization.load_pem_private_key(private_pem.encode(), None)
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    signature = private_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64(signature)}"


def _payload(**overrides) -> dict:
    payload = {"sub": "alice", "exp": int(time.time()) + 300, "scope": "publish", "stream": "cam-1",
               "aud": DEFAULT_AUDIENCE}
    payload.update(overrides)
    return {key: value for key, value in payload.items() if value is not None}


# --- valid tokens, every accepted algorithm -------------------------------------------------------


@pytest.mark.parametrize("key_fixture", ["rsa_keys", "ec_keys", "ed_keys"])
def test_asymmetric_algorithms_verify_with_pem(request, key_fixture):
    keys: KeyPair = request.getfixturevalue(key_fixture)
    verifier = TokenVerifier(TokenSettings(secret=None, public_keys=(keys.public_pem,)))
    token = issue_token(keys.private_pem, keys.algorithm, Scope.PUBLISH, "cam-1", 60, "alice")
    claims = verifier.verify(token, Scope.PUBLISH, "cam-1")
    assert claims.subject == "alice"
    assert claims.scopes == frozenset({Scope.PUBLISH})
    assert claims.stream_pattern == "cam-1"
    assert claims.expires_at > time.time()
    assert verifier.algorithms == frozenset({keys.algorithm})


@pytest.mark.parametrize("key_fixture", ["rsa_keys", "ec_keys", "ed_keys"])
def test_asymmetric_algorithms_verify_with_jwk(request, key_fixture):
    keys: KeyPair = request.getfixturevalue(key_fixture)
    verifier = TokenVerifier(TokenSettings(secret=None, public_keys=(keys.public_jwk,)))
    token = issue_token(keys.private_pem, keys.algorithm, "play", "cam-1", 60, "bob")
    assert verifier.verify(token, Scope.PLAY, "cam-1").subject == "bob"


def test_hs256_with_secret():
    verifier = TokenVerifier(TokenSettings(secret=SECRET))
    token = issue_token(SECRET, "HS256", [Scope.PLAY], "cam-1", 60, None)
    claims = verifier.verify(token, Scope.PLAY, "cam-1")
    assert claims.subject is None
    assert claims.raw["scope"] == "play"


def test_hs256_with_wrong_secret_is_unauthorized():
    verifier = TokenVerifier(TokenSettings(secret=SECRET))
    token = issue_token(SECRET + "x", "HS256", "play", "cam-1", 60, None)
    with pytest.raises(Unauthorized, match="signature"):
        verifier.verify(token, Scope.PLAY, "cam-1")


def test_token_signed_by_another_rsa_key_is_unauthorized(rsa_keys, other_rsa_keys):
    verifier = TokenVerifier(TokenSettings(secret=None, public_keys=(rsa_keys.public_pem,)))
    token = issue_token(other_rsa_keys.private_pem, "RS256", "play", "cam-1", 60, None)
    with pytest.raises(Unauthorized, match="signature"):
        verifier.verify(token, Scope.PLAY, "cam-1")


# --- algorithm attacks ----------------------------------------------------------------------------


def test_alg_none_is_rejected(rsa_keys):
    for settings in (TokenSettings(secret=SECRET), TokenSettings(None, (rsa_keys.public_pem,))):
        verifier = TokenVerifier(settings)
        token = jwt.encode(_payload(), None, algorithm="none")
        with pytest.raises(Unauthorized, match="algorithm"):
            verifier.verify(token, Scope.PUBLISH, "cam-1")
        # Also the hand-made variants an attacker would try: 'None', 'NONE', empty signature.
        for alg in ("None", "NONE", "nOnE"):
            forged = f"{_b64(json.dumps({'alg': alg}).encode())}.{_b64(json.dumps(_payload()).encode())}."
            with pytest.raises(Unauthorized):
                verifier.verify(forged, Scope.PUBLISH, "cam-1")


@pytest.mark.parametrize("with_secret", [False, True])
def test_hs256_signed_with_rsa_public_key_is_rejected(rsa_keys, with_secret):
    # The classic confusion: the attacker knows the RSA public key and uses its PEM as an HMAC secret.
    forged = _hand_signed_hs256(
        {"alg": "HS256", "typ": "JWT"}, _payload(scope="admin", stream="*"), rsa_keys.public_pem.encode()
    )
    verifier = TokenVerifier(
        TokenSettings(secret=SECRET if with_secret else None, public_keys=(rsa_keys.public_pem,))
    )
    with pytest.raises(Unauthorized):
        verifier.verify(forged, Scope.ADMIN, None)


def test_rs256_token_against_secret_only_verifier(rsa_keys):
    verifier = TokenVerifier(TokenSettings(secret=SECRET))
    token = issue_token(rsa_keys.private_pem, "RS256", "admin", None, 60, None)
    with pytest.raises(Unauthorized, match="algorithm"):
        verifier.verify(token, Scope.ADMIN, None)


def test_es256_token_against_rsa_key_is_rejected(rsa_keys, ec_keys):
    verifier = TokenVerifier(TokenSettings(secret=None, public_keys=(rsa_keys.public_pem,)))
    token = issue_token(ec_keys.private_pem, "ES256", "admin", None, 60, None)
    with pytest.raises(Unauthorized):
        verifier.verify(token, Scope.ADMIN, None)


# --- time, audience, issuer -----------------------------------------------------------------------

# Time claims below are offsets from the moment the test runs (a module-level "now" goes stale on a
# slow machine long before the leeway cases run).
TIME_CLAIMS = ("exp", "nbf", "iat")

TIME_AND_AUDIENCE_CASES = [
    # (description, payload overrides, verifier audience, verifier issuer, expected error or None)
    ("expired", {"exp": -60}, DEFAULT_AUDIENCE, None, "expired"),
    ("expired within leeway", {"exp": -2}, DEFAULT_AUDIENCE, None, None),
    ("nbf in the future", {"nbf": 60}, DEFAULT_AUDIENCE, None, "not yet valid"),
    ("nbf within leeway", {"nbf": 2}, DEFAULT_AUDIENCE, None, None),
    ("iat in the future", {"iat": 60}, DEFAULT_AUDIENCE, None, "not yet valid"),
    ("no exp", {"exp": None}, DEFAULT_AUDIENCE, None, "exp"),
    ("default audience", {}, DEFAULT_AUDIENCE, None, None),
    ("no audience, default expected", {"aud": None}, DEFAULT_AUDIENCE, None, "aud"),
    ("another service's audience", {"aud": "grafana"}, DEFAULT_AUDIENCE, None, "audience"),
    ("right audience", {"aud": "studio"}, "studio", None, None),
    ("audience list", {"aud": ["other", "studio"]}, "studio", None, None),
    ("wrong audience", {"aud": "other"}, "studio", None, "audience"),
    ("the default where another is configured", {}, "studio", None, "audience"),
    ("missing audience", {"aud": None}, "studio", None, "aud"),
    ("right issuer", {"iss": "https://idp"}, DEFAULT_AUDIENCE, "https://idp", None),
    ("wrong issuer", {"iss": "https://evil"}, DEFAULT_AUDIENCE, "https://idp", "issuer"),
    ("missing issuer", {}, DEFAULT_AUDIENCE, "https://idp", "iss"),
    ("audience and issuer", {"aud": "studio", "iss": "https://idp"}, "studio", "https://idp", None),
]


@pytest.mark.parametrize(
    "overrides,audience,issuer,error",
    [case[1:] for case in TIME_AND_AUDIENCE_CASES],
    ids=[case[0] for case in TIME_AND_AUDIENCE_CASES],
)
def test_time_audience_issuer(overrides, audience, issuer, error):
    verifier = TokenVerifier(
        TokenSettings(secret=SECRET, audience=audience, issuer=issuer, leeway_seconds=5)
    )
    now = int(time.time())
    overrides = {key: now + value if key in TIME_CLAIMS and value is not None else value
                 for key, value in overrides.items()}
    token = jwt.encode(_payload(**overrides), SECRET, algorithm="HS256")
    if error is None:
        assert verifier.verify(token, Scope.PUBLISH, "cam-1").subject == "alice"
    else:
        with pytest.raises(Unauthorized, match=error):
            verifier.verify(token, Scope.PUBLISH, "cam-1")


def test_zero_leeway_rejects_just_expired():
    verifier = TokenVerifier(TokenSettings(secret=SECRET, leeway_seconds=0))
    token = jwt.encode(_payload(exp=int(time.time()) - 2), SECRET, algorithm="HS256")
    with pytest.raises(Unauthorized, match="expired"):
        verifier.verify(token, Scope.PUBLISH, "cam-1")


class Signatures:
    """Counts the signature checks a verifier makes (PyJWT's own decode, called through)."""

    def __init__(self, monkeypatch) -> None:
        self.checked = 0
        real = jwt.decode

        def decode(*args, **kwargs):
            self.checked += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(jwt, "decode", decode)


def test_a_verified_token_is_remembered_and_still_expires(monkeypatch):
    signatures = Signatures(monkeypatch)
    now = [time.time()]
    verifier = TokenVerifier(TokenSettings(secret=SECRET, leeway_seconds=5), clock=lambda: now[0])
    token = jwt.encode(_payload(exp=int(now[0]) + 60), SECRET, algorithm="HS256")
    for _ in range(5):
        assert verifier.verify(token, Scope.PUBLISH, "cam-1").subject == "alice"
    assert signatures.checked == 1
    with pytest.raises(Forbidden):  # what it grants is still checked on every use
        verifier.verify(token, Scope.PUBLISH, "other")
    now[0] += 64  # within the leeway
    assert verifier.verify(token, Scope.PUBLISH, "cam-1").subject == "alice"
    now[0] += 2
    with pytest.raises(Unauthorized, match="expired"):
        verifier.verify(token, Scope.PUBLISH, "cam-1")


def test_long_and_bad_tokens_are_checked_every_time(monkeypatch):
    signatures = Signatures(monkeypatch)
    verifier = TokenVerifier(TokenSettings(secret=SECRET))
    long_token = jwt.encode(_payload(exp=int(time.time()) + 60, pad="x" * 2000), SECRET,
                            algorithm="HS256")
    bad = jwt.encode(_payload(exp=int(time.time()) + 60), "another-secret-" + "y" * 32,
                     algorithm="HS256")
    for _ in range(3):
        verifier.verify(long_token, Scope.PUBLISH, "cam-1")
        with pytest.raises(Unauthorized):
            verifier.verify(bad, Scope.PUBLISH, "cam-1")
    assert signatures.checked == 6


def test_issue_token_with_audience_and_issuer_round_trips():
    verifier = TokenVerifier(TokenSettings(secret=SECRET, audience="livedge", issuer="ops"))
    token = issue_token(SECRET, "HS256", "play", "*", 60, "carol", audience="livedge", issuer="ops")
    assert verifier.verify(token, Scope.PLAY, "anything").subject == "carol"


def test_issue_token_now_and_ttl_set_exp():
    token = issue_token(SECRET, "HS256", "play", "*", 30, None, now=1_000_000)
    payload = jwt.decode(token, options={"verify_signature": False})
    assert (payload["iat"], payload["exp"]) == (1_000_000, 1_000_030)


# --- scopes and streams ---------------------------------------------------------------------------

SCOPE_CASES = [
    # (description, scope claim, stream claim, requested scope, requested stream, outcome)
    ("publish own stream", "publish", "cam-1", Scope.PUBLISH, "cam-1", "ok"),
    ("play token cannot publish", "play", "cam-1", Scope.PUBLISH, "cam-1", "forbidden"),
    ("publish token cannot play", "publish", "cam-1", Scope.PLAY, "cam-1", "forbidden"),
    ("publish token is not admin", "publish play", "*", Scope.ADMIN, None, "forbidden"),
    ("wrong stream", "publish", "cam-1", Scope.PUBLISH, "cam-2", "forbidden"),
    ("exact match is not prefix", "play", "cam", Scope.PLAY, "cam-1", "forbidden"),
    ("glob match", "play", "cam-*", Scope.PLAY, "cam-42", "ok"),
    ("glob miss", "play", "cam-*", Scope.PLAY, "studio", "forbidden"),
    ("glob is case-sensitive", "play", "cam-*", Scope.PLAY, "CAM-1", "forbidden"),
    ("star matches all", "play", "*", Scope.PLAY, "anything", "ok"),
    ("no stream claim matches nothing", "play", None, Scope.PLAY, "cam-1", "forbidden"),
    ("no stream claim, no stream asked", "play", None, Scope.PLAY, None, "ok"),
    ("admin without stream claim", "admin", None, Scope.PUBLISH, "cam-1", "ok"),
    ("admin implies play", "admin", None, Scope.PLAY, "cam-1", "ok"),
    ("admin bounded by its stream claim", "admin", "cam-*", Scope.PLAY, "studio", "forbidden"),
    ("scope list", ["play", "publish"], "cam-1", Scope.PUBLISH, "cam-1", "ok"),
    ("scope string with several", "play publish", "cam-1", Scope.PUBLISH, "cam-1", "ok"),
    ("unknown scope words ignored", "openid play", "cam-1", Scope.PLAY, "cam-1", "ok"),
    ("unknown scope grants nothing", "openid profile", "cam-1", Scope.PLAY, "cam-1", "forbidden"),
    ("no scope claim", None, "cam-1", Scope.PLAY, "cam-1", "forbidden"),
    ("scope word case matters", "PUBLISH", "cam-1", Scope.PUBLISH, "cam-1", "forbidden"),
    ("malformed scope claim", 7, "cam-1", Scope.PLAY, "cam-1", "unauthorized"),
    ("malformed stream claim", "play", ["cam-1"], Scope.PLAY, "cam-1", "unauthorized"),
]


@pytest.mark.parametrize(
    "scope_claim,stream_claim,scope,stream,outcome",
    [case[1:] for case in SCOPE_CASES],
    ids=[case[0] for case in SCOPE_CASES],
)
def test_scopes_and_streams(scope_claim, stream_claim, scope, stream, outcome):
    verifier = TokenVerifier(TokenSettings(secret=SECRET))
    token = jwt.encode(_payload(scope=scope_claim, stream=stream_claim), SECRET, algorithm="HS256")
    if outcome == "ok":
        claims = verifier.verify(token, scope, stream)
        assert claims.allows(scope, stream)
    elif outcome == "forbidden":
        with pytest.raises(Forbidden):
            verifier.verify(token, scope, stream)
    else:
        with pytest.raises(Unauthorized):
            verifier.verify(token, scope, stream)


def test_claims_allows_is_pure():
    claims = Claims("x", frozenset({Scope.PLAY}), "live-*", 0.0, {})
    assert claims.allows(Scope.PLAY, "live-a")
    assert not claims.allows(Scope.PUBLISH, "live-a")
    assert not claims.allows(Scope.PLAY, "other")


# --- kid handling ---------------------------------------------------------------------------------


def _jwks_verifier(*keys: KeyPair, kids: tuple[str, ...]) -> TokenVerifier:
    jwks = tuple({**key.public_jwk, "kid": kid} for key, kid in zip(keys, kids))
    return TokenVerifier(TokenSettings(secret=None, public_keys=jwks))


def test_jwks_with_two_kids_selects_by_kid(rsa_keys, other_rsa_keys):
    verifier = _jwks_verifier(rsa_keys, other_rsa_keys, kids=("k1", "k2"))
    first = issue_token(rsa_keys.private_pem, "RS256", "play", "*", 60, "one", key_id="k1")
    second = issue_token(other_rsa_keys.private_pem, "RS256", "play", "*", 60, "two", key_id="k2")
    assert verifier.verify(first, Scope.PLAY, "s").subject == "one"
    assert verifier.verify(second, Scope.PLAY, "s").subject == "two"
    # The right key under the wrong kid fails: the kid picks exactly one key.
    swapped = issue_token(rsa_keys.private_pem, "RS256", "play", "*", 60, "one", key_id="k2")
    with pytest.raises(Unauthorized, match="signature"):
        verifier.verify(swapped, Scope.PLAY, "s")


def test_jwks_with_mixed_key_types(rsa_keys, ed_keys):
    verifier = _jwks_verifier(rsa_keys, ed_keys, kids=("rsa", "ed"))
    token = issue_token(ed_keys.private_pem, "EdDSA", "publish", "cam-1", 60, None, key_id="ed")
    assert verifier.verify(token, Scope.PUBLISH, "cam-1").scopes == {Scope.PUBLISH}
    # The kid names an RSA key but the token claims EdDSA: refused without trying the signature.
    mislabelled = issue_token(ed_keys.private_pem, "EdDSA", "publish", "cam-1", 60, None, key_id="rsa")
    with pytest.raises(Unauthorized, match="unknown signing key"):
        verifier.verify(mislabelled, Scope.PUBLISH, "cam-1")


@pytest.mark.parametrize(
    "kid",
    ["../../etc/passwd", "/dev/null", "' OR '1'='1", "k1; DROP TABLE keys", "k1\x00", "", "K1", 1, None],
)
def test_kid_injection_is_unauthorized(rsa_keys, kid):
    verifier = _jwks_verifier(rsa_keys, kids=("k1",))
    header = {"alg": "RS256", "typ": "JWT"} if kid is None else {"alg": "RS256", "kid": kid}
    token = _hand_signed_rs256(header, _payload(), rsa_keys.private_pem)
    if kid is None:
        # No kid at all: the one key of the token's algorithm is tried, and it is the right one.
        assert verifier.verify(token, Scope.PUBLISH, "cam-1").subject == "alice"
    else:
        with pytest.raises(Unauthorized):
            verifier.verify(token, Scope.PUBLISH, "cam-1")


def test_kid_is_ignored_when_no_key_has_one():
    verifier = TokenVerifier(TokenSettings(secret=SECRET))
    token = jwt.encode(_payload(), SECRET, algorithm="HS256", headers={"kid": "../../etc/passwd"})
    assert verifier.verify(token, Scope.PUBLISH, "cam-1").subject == "alice"


# --- garbage and size -----------------------------------------------------------------------------


def test_oversized_token_is_rejected_before_parsing():
    verifier = TokenVerifier(TokenSettings(secret=SECRET, max_token_bytes=512))
    token = jwt.encode(_payload(padding="x" * 600), SECRET, algorithm="HS256")
    with pytest.raises(Unauthorized, match="too large"):
        verifier.verify(token, Scope.PUBLISH, "cam-1")
    small = jwt.encode(_payload(), SECRET, algorithm="HS256")
    assert verifier.verify(small, Scope.PUBLISH, "cam-1").subject == "alice"


GARBAGE = [
    None,
    "",
    "x",
    "...",
    "a.b.c",
    "a.b",
    "a.b.c.d.e",
    "Bearer abc",
    "\x00\x00\x00",
    "é.é.é",
    "\ud800.x.y",
    _b64(b"[1,2]") + "." + _b64(b"{}") + ".",
    _b64(b'{"alg":"HS256"}') + "." + _b64(b"[]") + ".sig",
    _b64(b'{"alg":"HS256"}') + "." + _b64(b"not json") + ".sig",
    _b64(b'{"alg":["HS256"]}') + "." + _b64(b"{}") + ".sig",
    _b64(b'{"alg":"HS256","crit":["x"]}') + "." + _b64(b"{}") + ".sig",
    "eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjk5OTk5OTk5OTl9.!!!",
    "=" * 100,
]


@pytest.mark.parametrize("token", GARBAGE, ids=range(len(GARBAGE)))
def test_garbage_is_unauthorized(token):
    verifier = TokenVerifier(TokenSettings(secret=SECRET))
    with pytest.raises(Unauthorized):
        verifier.verify(token, Scope.PLAY, "cam-1")


def test_tampered_payload_is_unauthorized():
    verifier = TokenVerifier(TokenSettings(secret=SECRET))
    header, _, signature = issue_token(SECRET, "HS256", "play", "cam-1", 60, None).split(".")
    escalated = _b64(json.dumps(_payload(scope="admin", stream="*")).encode())
    with pytest.raises(Unauthorized, match="signature"):
        verifier.verify(f"{header}.{escalated}.{signature}", Scope.ADMIN, None)


# --- construction ---------------------------------------------------------------------------------


def test_from_files_loads_pem_and_jwks(tmp_path, rsa_keys, ec_keys, ed_keys):
    pem_file = tmp_path / "key.pem"
    pem_file.write_text(rsa_keys.public_pem)
    jwks_file = tmp_path / "jwks.json"
    jwks = {"keys": [{**ec_keys.public_jwk, "kid": "ec"}, {**ed_keys.public_jwk, "kid": "ed"}]}
    jwks_file.write_text(json.dumps(jwks))
    verifier = TokenVerifier.from_files(SECRET, str(pem_file), str(jwks_file), "aud", "iss")
    assert verifier.algorithms == {"HS256", "RS256", "ES256", "EdDSA"}
    token = issue_token(ec_keys.private_pem, "ES256", "play", "*", 60, "e", "aud", "iss", key_id="ec")
    assert verifier.verify(token, Scope.PLAY, "x").subject == "e"
    # The kid-less HS256 token still reaches the secret.
    token = issue_token(SECRET, "HS256", "play", "*", 60, "h", "aud", "iss")
    assert verifier.verify(token, Scope.PLAY, "x").subject == "h"


@pytest.mark.parametrize(
    "contents,error",
    [
        ("not json", "jwks.json"),
        ('{"keys": "nope"}', "keys"),
        ('{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}', "symmetric"),
        ('{"keys": [{"kty": "RSA"}]}', "JWK"),
    ],
)
def test_bad_jwks_file_fails_at_construction(tmp_path, contents, error):
    path = tmp_path / "jwks.json"
    path.write_text(contents)
    with pytest.raises(KeyLoadError, match=error):
        TokenVerifier.from_files(None, None, str(path))


def test_construction_errors(tmp_path, rsa_keys, ec_keys):
    with pytest.raises(KeyLoadError, match="no JWT secret"):
        TokenVerifier(TokenSettings(secret=None))
    with pytest.raises(KeyLoadError, match="empty"):
        TokenVerifier(TokenSettings(secret=""))
    with pytest.raises(KeyLoadError, match="PEM"):
        TokenVerifier(TokenSettings(secret=None, public_keys=("garbage",)))
    with pytest.raises(KeyLoadError, match="missing.pem"):
        TokenVerifier.from_files(None, str(tmp_path / "missing.pem"), None)
    duplicate = ({**rsa_keys.public_jwk, "kid": "a"}, {**ec_keys.public_jwk, "kid": "a"})
    with pytest.raises(KeyLoadError, match="duplicate"):
        TokenVerifier(TokenSettings(secret=None, public_keys=duplicate))
    # A JWK whose declared alg disagrees with its key type would widen the accepted algorithms.
    for declared in ("HS256", "RS512", "none"):
        jwk = {**rsa_keys.public_jwk, "alg": declared}
        with pytest.raises(KeyLoadError, match="declares alg|JWK"):
            TokenVerifier(TokenSettings(secret=None, public_keys=(jwk,)))
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    p384_pem = p384.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    with pytest.raises(KeyLoadError, match="P-256"):
        TokenVerifier(TokenSettings(secret=None, public_keys=(p384_pem,)))


def test_private_jwk_only_verifies(rsa_keys):
    private_key = serialization.load_pem_private_key(rsa_keys.private_pem.encode(), None)
    private_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private_key))
    verifier = TokenVerifier(TokenSettings(secret=None, public_keys=(private_jwk,)))
    token = issue_token(rsa_keys.private_pem, "RS256", "play", "*", 60, "p")
    assert verifier.verify(token, Scope.PLAY, "x").subject == "p"


def test_issue_token_rejects_unknown_algorithm_and_scope():
    with pytest.raises(ValueError):
        issue_token(SECRET, "none", "play", None, 60, None)
    with pytest.raises(ValueError):
        issue_token(SECRET, "HS256", "superuser", None, 60, None)


# --- bearer_token ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header,query,expected",
    [
        ("Bearer abc.def.ghi", None, "abc.def.ghi"),
        ("bearer   abc ", None, "abc"),
        ("BEARER abc", "fromquery", "abc"),
        ("Basic dXNlcjpwYXNz", "q", "q"),
        ("Bearer", "q", "q"),
        ("Bearer ", None, None),
        (None, "q", "q"),
        (None, "", None),
        ("", None, None),
        (None, None, None),
    ],
)
def test_bearer_token(header, query, expected):
    assert bearer_token(header, query) == expected
