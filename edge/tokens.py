"""JWT rules for publishing, playback and admin access.

Pure: the only I/O is reading key files in ``TokenVerifier.from_files``. The rules:

* The algorithm is derived from the configured key, never taken on trust from the token: HS256 only with
  the shared secret; RS256, ES256 (P-256) and EdDSA only with public keys of that type. A token whose
  ``alg`` no configured key accepts (``none``, or HS256 against an RSA key) is rejected before any
  signature check, which closes the algorithm-confusion hole.
* ``kid`` is only ever a dictionary key. When any configured key has a ``kid`` (a JWKS), a token's
  ``kid`` must name one of them. When none has (a bare secret or PEM), ``kid`` is ignored and every key
  of the token's algorithm is tried.
* ``exp`` and ``aud`` are required: ``aud`` must name the configured audience (``livedge`` unless
  ``JWT_AUDIENCE`` says otherwise), so a token a shared key signed for another service is refused.
  ``nbf``/``iat`` are honoured with ``leeway_seconds`` of clock skew; ``iss`` is checked when
  configured.
* Claims: ``scope`` (space-separated string or list of ``publish``/``play``/``admin``; other values are
  ignored), ``stream`` (an exact name or an fnmatch pattern such as ``cam-*``). ``admin`` implies
  ``publish`` and ``play``. A token without ``stream`` covers no stream unless it is an admin token.

Failures raise ``Unauthorized`` (the token is unusable) or ``Forbidden`` (the token is fine but does not
grant this action on this stream).

A verifier remembers the claims of the tokens it verified (a bounded LRU): a player sends its play
token with every request, and a signature check costs 50-200 µs of Python where the request
itself costs less. Only ``exp`` can change a verified token's fate later, and it is checked on
every hit. A new verifier (a key reload) starts empty.
"""

from __future__ import annotations

import enum
import fnmatch
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import jwt
import lru
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from edge.errors import Forbidden, Unauthorized


class Scope(enum.Enum):
    PUBLISH = "publish"
    PLAY = "play"
    ADMIN = "admin"


class KeyLoadError(ValueError):
    """A configured secret, key file or JWKS cannot be used. Raised at construction, never on verify."""


HMAC_ALGORITHM = "HS256"
DEFAULT_AUDIENCE = "livedge"  # the ``aud`` every token must carry unless JWT_AUDIENCE names another
ASYMMETRIC_ALGORITHMS = ("RS256", "ES256", "EdDSA")


@dataclass(frozen=True)
class TokenSettings:
    """What a ``TokenVerifier`` trusts.

    ``public_keys`` holds PEM strings (SubjectPublicKeyInfo) and/or JWK dictionaries; a JWKS is given as
    its individual keys. ``leeway_seconds`` is the tolerated clock skew for ``exp``/``nbf``/``iat``;
    ``max_token_bytes`` bounds the encoded token before any parsing.
    """

    secret: str | None
    public_keys: tuple[str | Mapping[str, Any], ...] = ()
    audience: str = DEFAULT_AUDIENCE
    issuer: str | None = None
    leeway_seconds: float = 5
    max_token_bytes: int = 8192


@dataclass(frozen=True)
class Claims:
    """The parts of a verified token that grant access. ``expires_at`` is Unix time in seconds."""

    subject: str | None
    scopes: frozenset[Scope]
    stream_pattern: str | None
    expires_at: float
    raw: dict[str, Any] = field(compare=False, repr=False)

    def has_scope(self, scope: Scope) -> bool:
        return scope in self.scopes or Scope.ADMIN in self.scopes

    def covers_stream(self, stream: str | None) -> bool:
        """Whether the ``stream`` claim covers ``stream``; ``None`` means no particular stream."""
        if stream is None:
            return True
        if self.stream_pattern is None:
            return Scope.ADMIN in self.scopes
        # fnmatchcase: stream names are case-sensitive on every platform.
        return fnmatch.fnmatchcase(stream, self.stream_pattern)

    def allows(self, scope: Scope, stream: str | None) -> bool:
        return self.has_scope(scope) and self.covers_stream(stream)


@dataclass(frozen=True)
class _VerificationKey:
    algorithm: str
    key: Any  # bytes for HMAC, a cryptography public key object otherwise
    key_id: str | None


def _algorithm_for_public_key(key: object) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise KeyLoadError(f"EC key on curve {key.curve.name} is not supported (ES256 needs P-256)")
        return "ES256"
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return "EdDSA"
    raise KeyLoadError(f"unsupported public key type {type(key).__name__}")


def _load_pem(pem: str) -> _VerificationKey:
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, UnsupportedAlgorithm) as error:
        raise KeyLoadError(f"not a PEM public key: {error}") from None
    return _VerificationKey(_algorithm_for_public_key(key), key, None)


_PRIVATE_KEY_TYPES = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)


# The algorithm a JWK verifies with follows from its key type (kty, crv), never from its "alg" member.
_JWK_ALGORITHMS = {
    ("RSA", None): "RS256",
    ("EC", "P-256"): "ES256",
    ("OKP", "Ed25519"): "EdDSA",
    ("OKP", "Ed448"): "EdDSA",
}


def _load_jwk(jwk: Mapping[str, Any]) -> _VerificationKey:
    if not isinstance(jwk, Mapping):
        raise KeyLoadError("a JWK must be a JSON object")
    key_type = jwk.get("kty")
    if key_type == "oct":
        raise KeyLoadError("symmetric JWKs are not accepted; configure the shared secret instead")
    curve = None if key_type == "RSA" else jwk.get("crv")
    algorithm = _JWK_ALGORITHMS.get((key_type, curve)) if isinstance(curve, (str, type(None))) else None
    if algorithm is None:
        raise KeyLoadError(f"unsupported JWK key type {key_type!r} curve {curve!r}")
    declared = jwk.get("alg")
    if declared is not None and declared != algorithm:
        raise KeyLoadError(f"JWK declares alg {declared!r} but its key type only allows {algorithm}")
    key_id = jwk.get("kid")
    if key_id is not None and not isinstance(key_id, str):
        raise KeyLoadError("JWK kid must be a string")
    try:
        key = jwt.PyJWK(dict(jwk), algorithm=algorithm).key
    except (jwt.PyJWTError, ValueError, TypeError, KeyError) as error:
        raise KeyLoadError(f"unusable JWK: {error}") from None
    if isinstance(key, _PRIVATE_KEY_TYPES):
        # A JWK that carries private parts still only verifies here.
        key = key.public_key()
    # Belt and braces: the loaded object must be the type the algorithm expects.
    if _algorithm_for_public_key(key) != algorithm:
        raise KeyLoadError(f"JWK key does not match its type {key_type!r}")
    return _VerificationKey(algorithm, key, key_id)


VERIFIED_CACHE_ENTRIES = 10_000
VERIFIED_CACHE_TOKEN_CHARS = 1024  # longer tokens are verified every time (bounds the memory)


class TokenVerifier:
    """Checks bearer tokens against configured keys. Its keys and rules never change; it remembers
    the tokens it verified. Use it from one thread (the event loop)."""

    def __init__(self, settings: TokenSettings, clock: Callable[[], float] = time.time) -> None:
        keys: list[_VerificationKey] = []
        if settings.secret is not None:
            if not settings.secret:
                raise KeyLoadError("the JWT secret is empty")
            keys.append(_VerificationKey(HMAC_ALGORITHM, settings.secret.encode(), None))
        for public_key in settings.public_keys:
            keys.append(_load_pem(public_key) if isinstance(public_key, str) else _load_jwk(public_key))
        if not keys:
            raise KeyLoadError("no JWT secret or public key is configured")
        keys_by_id: dict[str, _VerificationKey] = {}
        for key in keys:
            if key.key_id is not None:
                if key.key_id in keys_by_id:
                    raise KeyLoadError(f"duplicate JWK kid {key.key_id!r}")
                keys_by_id[key.key_id] = key
        self.settings = settings
        self._keys = tuple(keys)
        self._keys_by_id = keys_by_id
        self.algorithms = frozenset(key.algorithm for key in keys)
        self._clock = clock
        self._verified: lru.LRU = lru.LRU(VERIFIED_CACHE_ENTRIES)  # token -> Claims

    @classmethod
    def from_files(
        cls,
        secret: str | None,
        public_key_file: str | None,
        jwks_file: str | None,
        audience: str = DEFAULT_AUDIENCE,
        issuer: str | None = None,
        *,
        leeway_seconds: float = 5,
        max_token_bytes: int = 8192,
    ) -> TokenVerifier:
        """Build a verifier from a secret, a PEM public key file and/or a JWKS file
        (``{"keys": [...]}`` or a single JWK object). Raises ``KeyLoadError`` naming the bad file."""
        public_keys: list[str | Mapping[str, Any]] = []
        if public_key_file:
            try:
                with open(public_key_file, encoding="utf-8") as file:
                    pem = file.read()
            except (OSError, UnicodeDecodeError) as error:
                raise KeyLoadError(f"{public_key_file}: {error}") from None
            try:
                _load_pem(pem)
            except KeyLoadError as error:
                raise KeyLoadError(f"{public_key_file}: {error}") from None
            public_keys.append(pem)
        if jwks_file:
            try:
                with open(jwks_file, encoding="utf-8") as file:
                    document = json.load(file)
            except (OSError, ValueError) as error:
                raise KeyLoadError(f"{jwks_file}: {error}") from None
            if isinstance(document, dict) and isinstance(document.get("keys"), list):
                entries = document["keys"]
            elif isinstance(document, dict) and "kty" in document:
                entries = [document]
            else:
                raise KeyLoadError(f"{jwks_file}: expected a JWKS object with a 'keys' list")
            for entry in entries:
                try:
                    _load_jwk(entry)
                except KeyLoadError as error:
                    raise KeyLoadError(f"{jwks_file}: {error}") from None
                public_keys.append(entry)
        return cls(
            TokenSettings(
                secret=secret,
                public_keys=tuple(public_keys),
                audience=audience,
                issuer=issuer,
                leeway_seconds=leeway_seconds,
                max_token_bytes=max_token_bytes,
            )
        )

    def verify(self, token: str | None, scope: Scope, stream: str | None) -> Claims:
        """Return the claims of ``token`` if it grants ``scope`` on ``stream`` (``None``: no particular
        stream). Raises ``Unauthorized`` for an unusable token, ``Forbidden`` for a usable one that does
        not grant this."""
        claims = self.decode(token)
        if not claims.has_scope(scope):
            raise Forbidden(f"token does not grant {scope.value}")
        if not claims.covers_stream(stream):
            raise Forbidden("token does not cover this stream")
        return claims

    def decode(self, token: str | None) -> Claims:
        """Check signature and time/audience/issuer claims; raise ``Unauthorized`` on any failure."""
        if not token:
            raise Unauthorized("missing token")
        if not isinstance(token, str):
            raise Unauthorized("malformed token")
        verified = self._verified.get(token)
        if verified is not None:
            # What PyJWT would say now: expired once exp <= now - leeway.
            if verified.expires_at <= self._clock() - self.settings.leeway_seconds:
                del self._verified[token]
                raise Unauthorized("token expired")
            return verified
        claims = self._decode(token)
        if len(token) <= VERIFIED_CACHE_TOKEN_CHARS:
            self._verified[token] = claims
        return claims

    def _decode(self, token: str) -> Claims:
        if len(token.encode("utf-8", "surrogatepass")) > self.settings.max_token_bytes:
            raise Unauthorized("token too large")
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, ValueError, TypeError):
            raise Unauthorized("malformed token") from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self.algorithms:
            raise Unauthorized("token algorithm not accepted")
        payload = self._decode_with_candidates(token, algorithm, self._candidate_keys(header, algorithm))
        return _claims_from_payload(payload)

    def _candidate_keys(self, header: dict[str, Any], algorithm: str) -> list[_VerificationKey]:
        key_id = header.get("kid")
        if key_id is not None and self._keys_by_id:
            # A dictionary lookup and nothing else: kid is attacker-controlled.
            key = self._keys_by_id.get(key_id) if isinstance(key_id, str) else None
            if key is None or key.algorithm != algorithm:
                raise Unauthorized("unknown signing key")
            return [key]
        return [key for key in self._keys if key.algorithm == algorithm]

    def _decode_with_candidates(
        self, token: str, algorithm: str, candidates: list[_VerificationKey]
    ) -> dict[str, Any]:
        settings = self.settings
        options = {
            "require": ["exp", "aud"],
            "verify_iss": settings.issuer is not None,
        }
        for key in candidates:
            try:
                return jwt.decode(
                    token,
                    key=key.key,
                    algorithms=[algorithm],
                    audience=settings.audience,
                    issuer=settings.issuer,
                    leeway=settings.leeway_seconds,
                    options=options,
                )
            except jwt.InvalidSignatureError:
                # pyjwt checks the signature before any claim, so only this error means "try another key".
                continue
            except jwt.ExpiredSignatureError:
                raise Unauthorized("token expired") from None
            except jwt.ImmatureSignatureError:
                raise Unauthorized("token not yet valid") from None
            except jwt.InvalidAudienceError:
                raise Unauthorized("token audience not accepted") from None
            except jwt.InvalidIssuerError:
                raise Unauthorized("token issuer not accepted") from None
            except jwt.MissingRequiredClaimError as error:
                raise Unauthorized(f"token lacks the {error.claim} claim") from None
            except (jwt.PyJWTError, ValueError, TypeError):
                raise Unauthorized("malformed token") from None
        raise Unauthorized("bad token signature")


def _claims_from_payload(payload: dict[str, Any]) -> Claims:
    raw_scope = payload.get("scope")
    if raw_scope is None:
        scope_words: Iterable[object] = ()
    elif isinstance(raw_scope, str):
        scope_words = raw_scope.split()
    elif isinstance(raw_scope, list):
        scope_words = raw_scope
    else:
        raise Unauthorized("malformed scope claim")
    known = {scope.value: scope for scope in Scope}
    # Unknown scope words (from a shared identity provider) are ignored, not an error.
    scopes = frozenset(known[word] for word in scope_words if isinstance(word, str) and word in known)
    stream_pattern = payload.get("stream")
    if stream_pattern is not None and (not isinstance(stream_pattern, str) or not stream_pattern):
        raise Unauthorized("malformed stream claim")
    subject = payload.get("sub")
    try:
        expires_at = float(payload["exp"])
    except OverflowError:  # a signed token can still carry an absurd number
        raise Unauthorized("malformed exp claim") from None
    return Claims(
        subject=subject if isinstance(subject, str) else None,
        scopes=scopes,
        stream_pattern=stream_pattern,
        expires_at=expires_at,
        raw=payload,
    )


def issue_token(
    secret_or_private_key_pem: str,
    algorithm: str,
    scopes: Scope | str | Iterable[Scope | str],
    stream: str | None,
    ttl_seconds: float,
    subject: str | None,
    audience: str = DEFAULT_AUDIENCE,
    issuer: str | None = None,
    *,
    key_id: str | None = None,
    now: float | None = None,
) -> str:
    """Sign a token (for ``livedge token`` and tests). ``algorithm`` is HS256 with a secret or RS256,
    ES256, EdDSA with a PEM private key; ``ttl_seconds`` counts from ``now`` (Unix seconds, default the
    current time). ``stream`` may be a pattern; ``None`` leaves the claim out."""
    if algorithm != HMAC_ALGORITHM and algorithm not in ASYMMETRIC_ALGORITHMS:
        raise ValueError(f"unsupported algorithm {algorithm!r}")
    if isinstance(scopes, (Scope, str)):
        scopes = [scopes]
    scope_values = [Scope(scope).value if isinstance(scope, str) else scope.value for scope in scopes]
    issued_at = time.time() if now is None else now
    payload: dict[str, Any] = {
        "iat": int(issued_at),
        "exp": int(issued_at + ttl_seconds),
        "scope": " ".join(scope_values),
    }
    if subject is not None:
        payload["sub"] = subject
    if stream is not None:
        payload["stream"] = stream
    payload["aud"] = audience
    if issuer is not None:
        payload["iss"] = issuer
    headers = {"kid": key_id} if key_id is not None else None
    return jwt.encode(payload, secret_or_private_key_pem, algorithm=algorithm, headers=headers)


def bearer_token(authorization_header: str | None, query_token: str | None) -> str | None:
    """The token a request carries: ``Authorization: Bearer <token>`` first, else a ``?token=`` query
    value (players that cannot set headers). Returns ``None`` when there is none."""
    if authorization_header:
        scheme, _, value = authorization_header.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    if query_token and query_token.strip():
        return query_token.strip()
    return None
