"""Verifying a CDS client's JWT (CDS Hooks 2.0 "Trusting CDS Clients").

Every hook call and feedback POST carries ``Authorization: Bearer <JWT>``
signed by the CDS client (the EHR).  The service accepts it only when:

- ``alg`` is ES384 or RS384 (never ``none``, never an HMAC: an HMAC "signed"
  with a public key would verify against that public key);
- ``iss`` is on the allow-list; its keys are the JWKS registered for it, or
  the JWKS at the header's ``jku`` when that URL is on the issuer's own
  ``jku`` allow-list (Epic's way) — any other ``jku`` is refused unfetched;
- the signature verifies; ``aud`` is this service's URL; ``exp`` is in the
  future, ``iat`` not in the future; ``jti`` has not been seen before.

Any failure is one ``AuthError`` (the one exception tree); the route answers 401 with no detail of
why (the reason goes to the log, never the token).
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import requests
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from fhir_plugin import AuthError

__all__ = ["CdsClientTrust", "JwtVerifier", "JtiStore", "ALGORITHMS", "trust_from_json"]

log = logging.getLogger("smart_launch.cds")

#: CDS Hooks 2.0: the client signs with ES384 or RS384 (and Epic uses RS384)
ALGORITHMS = ("ES384", "RS384")
#: clock skew allowed on exp / iat
LEEWAY = 30.0
#: the longest a client's JWT may live (CDS Hooks: exp no more than 5 minutes after iat)
MAX_LIFETIME = 300.0 + LEEWAY


@dataclass(frozen=True)
class CdsClientTrust:
    """One trusted CDS client: its ``iss`` and where its keys come from."""

    iss: str
    jwks: Mapping[str, Any] | None = None  # pre-registered public keys
    jwks_url: str | None = None  # or a registered JWKS URL
    jku: tuple[str, ...] = ()  # JWKS URLs a JWT's ``jku`` header may name


def trust_from_json(data: Any) -> tuple[CdsClientTrust, ...]:
    """Trusted clients from JSON (the ``CDS_CLIENTS`` file): ``[{"iss", "jwks"|"jwks_url", "jku": [...]}]``."""
    items = data.get("clients", []) if isinstance(data, dict) else data
    out = []
    for item in items or []:
        out.append(
            CdsClientTrust(
                iss=str(item["iss"]),
                jwks=item.get("jwks"),
                jwks_url=item.get("jwks_url"),
                jku=tuple(item.get("jku") or ()),
            )
        )
    return tuple(out)


class JtiStore(Protocol):
    """Remembers JWT ids until they expire: ``remember`` is False for one seen before."""

    def remember(self, iss: str, jti: str, until: float) -> bool: ...


def _segment(token: str, index: int) -> dict[str, Any]:
    try:
        part = token.split(".")[index]
        data = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (IndexError, ValueError) as exc:
        raise AuthError("malformed JWT") from exc
    if not isinstance(data, dict):
        raise AuthError("malformed JWT")
    return data


@dataclass
class JwtVerifier:
    """Checks CDS client JWTs against an allow-list; JWKS fetched over ``http`` are cached for ``ttl`` seconds."""

    clients: tuple[CdsClientTrust, ...]
    jtis: JtiStore
    http: requests.Session = field(default_factory=requests.Session)
    clock: Callable[[], float] = time.time
    ttl: float = 300.0
    _cache: dict[str, tuple[float, KeySet]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _client(self, iss: Any) -> CdsClientTrust:
        found = next((c for c in self.clients if isinstance(iss, str) and c.iss == iss), None)
        if found is None:
            raise AuthError("unknown iss")
        return found

    def _fetch(self, url: str) -> KeySet:
        now = self.clock()
        with self._lock:
            cached = self._cache.get(url)
            if cached and cached[0] > now:
                return cached[1]
        try:
            answer = self.http.get(url, timeout=10, headers={"Accept": "application/json"})
            answer.raise_for_status()
            keys = KeySet.import_key_set(answer.json())
        except (requests.RequestException, ValueError, JoseError) as exc:
            raise AuthError("JWKS not available") from exc
        with self._lock:
            self._cache[url] = (now + self.ttl, keys)
        return keys

    def _keys(self, client: CdsClientTrust, header: Mapping[str, Any]) -> KeySet:
        jku = header.get("jku")
        if jku is not None:
            if jku not in client.jku:  # never fetch a URL the issuer did not register
                raise AuthError("jku not on the allow-list")
            return self._fetch(str(jku))
        if client.jwks is not None:
            try:
                return KeySet.import_key_set(dict(client.jwks))  # type: ignore[arg-type]
            except (ValueError, JoseError) as exc:
                raise AuthError("registered JWKS unusable") from exc
        if client.jwks_url:
            return self._fetch(client.jwks_url)
        raise AuthError("no keys for iss")

    def verify(self, authorization: str | None, audiences: tuple[str, ...]) -> dict[str, Any]:
        """The JWT's claims when every check passes; else ``AuthError`` (the reason is logged, not shown)."""
        try:
            return self._verify(authorization, audiences)
        except AuthError as exc:
            log.info("CDS client JWT refused: %s", exc)
            raise

    def _verify(self, authorization: str | None, audiences: tuple[str, ...]) -> dict[str, Any]:
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError("no bearer JWT")
        header = _segment(token, 0)
        if header.get("alg") not in ALGORITHMS:  # before any key is touched: no none, no HMAC
            raise AuthError("algorithm not allowed")
        client = self._client(_segment(token, 1).get("iss"))
        keys = self._keys(client, header)
        try:
            claims = dict(jwt.decode(token, keys, algorithms=list(ALGORITHMS)).claims)
        except (JoseError, ValueError) as exc:
            raise AuthError("signature does not verify") from exc
        now = self.clock()
        aud = claims.get("aud")
        auds = aud if isinstance(aud, list) else [aud]
        if not any(a in audiences for a in auds):
            raise AuthError("wrong aud")
        exp, iat, jti = claims.get("exp"), claims.get("iat"), claims.get("jti")
        if not isinstance(exp, (int, float)) or exp + LEEWAY <= now:
            raise AuthError("expired")
        if not isinstance(iat, (int, float)) or iat - LEEWAY > now or exp - iat > MAX_LIFETIME:
            raise AuthError("bad iat")
        if not isinstance(jti, str) or not jti:
            raise AuthError("no jti")
        if not self.jtis.remember(client.iss, jti, float(exp) + LEEWAY):
            raise AuthError("jti reused")
        return claims
