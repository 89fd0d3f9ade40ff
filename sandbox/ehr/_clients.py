"""The client registry: who may ask for tokens, from where, for what.

Loaded from a JSON file (see ``clients.example.json``) or filled from Python
in tests (``registry.register(Client(...))``).  A client is one of

- public (``token_endpoint_auth_method: "none"``): a browser or native app,
  authorization code + PKCE only, no secret;
- confidential symmetric (``client_secret_basic`` / ``client_secret_post``);
- confidential asymmetric (``private_key_jwt``): authenticates with a signed
  assertion checked against the JWKS stored here (SMART Backend Services,
  "client-confidential-asymmetric").  Keys are made at run time by whoever
  registers the client; none are committed.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from authlib.oauth2.rfc6749 import ClientMixin
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from . import _scopes

log = logging.getLogger("sandbox.ehr")

AUTH_METHODS = ("none", "client_secret_basic", "client_secret_post", "private_key_jwt")
GRANT_TYPES = ("authorization_code", "refresh_token", "client_credentials")


class ClientConfigError(ValueError):
    """A client registration that cannot be used as written."""


class MissingKeysError(ClientConfigError):
    """A backend client whose ``jwks_file`` does not exist (yet): its keys are made at run time."""


@dataclass
class Client(ClientMixin):
    """One registered client, as authlib's ``ClientMixin`` wants it."""

    client_id: str
    redirect_uris: list[str] = field(default_factory=list)
    scope: list[str] = field(default_factory=list)  # what it may be granted, SMART syntax
    token_endpoint_auth_method: str = "none"
    grant_types: list[str] | None = None  # None: derived from the auth method
    jwks: Mapping[str, Any] | None = None  # public keys, for private_key_jwt
    client_secret: str | None = None
    name: str = ""
    launch_url: str | None = None  # where /ehr/launch sends the browser

    def __post_init__(self) -> None:
        if not self.client_id or not isinstance(self.client_id, str):
            raise ClientConfigError("client_id is required")
        if self.token_endpoint_auth_method not in AUTH_METHODS:
            raise ClientConfigError(f"{self.client_id}: token_endpoint_auth_method must be one of {AUTH_METHODS}")
        if isinstance(self.scope, str):
            self.scope = _scopes.split(self.scope)
        try:
            _scopes.validate(" ".join(self.scope))
        except _scopes.ScopeError as exc:
            raise ClientConfigError(f"{self.client_id}: {exc}") from None
        if self.grant_types is None:
            if self.token_endpoint_auth_method == "private_key_jwt" and not self.redirect_uris:
                self.grant_types = ["client_credentials"]
            elif self.token_endpoint_auth_method == "private_key_jwt":
                self.grant_types = ["authorization_code", "refresh_token", "client_credentials"]
            else:
                self.grant_types = ["authorization_code", "refresh_token"]
        unknown = set(self.grant_types) - set(GRANT_TYPES)
        if unknown:
            raise ClientConfigError(f"{self.client_id}: unknown grant types {sorted(unknown)}")
        if "client_credentials" in self.grant_types and self.token_endpoint_auth_method == "none":
            # RFC 6749 §4.4: the client credentials grant is for confidential clients only.
            raise ClientConfigError(f"{self.client_id}: a public client cannot use client_credentials")
        if self.token_endpoint_auth_method == "private_key_jwt":
            if not self.jwks:
                raise ClientConfigError(f"{self.client_id}: private_key_jwt needs a jwks")
            self.key_set()  # fail now, not at the first token request
        if self.token_endpoint_auth_method.startswith("client_secret") and not self.client_secret:
            raise ClientConfigError(f"{self.client_id}: {self.token_endpoint_auth_method} needs a client_secret")

    # ------------------------------------------------------------ ClientMixin

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> None:
        # SMART App Launch: redirect_uri is REQUIRED on every authorize request;
        # no default means a request without one is refused.
        return None

    def get_allowed_scope(self, scope: str | None) -> str | None:
        try:
            granted = _scopes.allowed(scope, self.scope)
        except _scopes.ScopeError:
            return None
        return _scopes.join(granted) if granted else None

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.redirect_uris  # exact match, no prefix or pattern

    def check_client_secret(self, client_secret: str) -> bool:
        if not self.client_secret:
            return False
        return hmac.compare_digest(self.client_secret.encode(), client_secret.encode())

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == self.token_endpoint_auth_method

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code" and "authorization_code" in (self.grant_types or ())

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in (self.grant_types or ())

    # ------------------------------------------------------------ helpers

    @property
    def public(self) -> bool:
        return self.token_endpoint_auth_method == "none"

    def key_set(self) -> KeySet:
        """The client's public keys as joserfc key objects (EC keys must be objects, not PEM)."""
        try:
            keys = KeySet.import_key_set(dict(self.jwks or {}))  # type: ignore[arg-type]  # a malformed set is refused below
        except (JoseError, ValueError, KeyError, TypeError) as exc:
            raise ClientConfigError(f"{self.client_id}: unusable jwks ({type(exc).__name__})") from None
        if any(k.is_private for k in keys.keys):
            raise ClientConfigError(f"{self.client_id}: the jwks must hold public keys only")
        return keys

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base_dir: Path | None = None) -> Client:
        data = dict(data)
        jwks_file = data.pop("jwks_file", None)
        if jwks_file:
            path = Path(jwks_file)
            if base_dir is not None and not path.is_absolute():
                path = base_dir / path
            if not path.exists():
                raise MissingKeysError(f"{data.get('client_id')}: no jwks_file at {path}")
            try:
                data["jwks"] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ClientConfigError(f"{data.get('client_id')}: cannot read jwks_file {path}: {exc}") from None
        known = set(cls.__dataclass_fields__)
        extra = set(data) - known
        if extra:
            raise ClientConfigError(f"{data.get('client_id')}: unknown fields {sorted(extra)}")
        return cls(**data)


class ClientRegistry:
    """Thread-safe map client_id -> Client."""

    def __init__(self, clients: Iterable[Client] = ()) -> None:
        self._lock = threading.Lock()
        self._clients: dict[str, Client] = {}
        for client in clients:
            self.register(client)

    def register(self, client: Client) -> Client:
        """Add or replace a client."""
        with self._lock:
            self._clients[client.client_id] = client
        return client

    def remove(self, client_id: str) -> None:
        with self._lock:
            self._clients.pop(client_id, None)

    def get(self, client_id: str | None) -> Client | None:
        if not isinstance(client_id, str):
            return None
        with self._lock:
            return self._clients.get(client_id)

    def all(self) -> list[Client]:
        with self._lock:
            return list(self._clients.values())

    def by_launch_url(self, url: str) -> Client | None:
        for client in self.all():
            if client.launch_url and client.launch_url == url:
                return client
        return None

    @classmethod
    def from_file(cls, path: str | Path) -> ClientRegistry:
        """Load ``{"clients": [...]}``; a ``jwks_file`` is read relative to the file."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ClientConfigError(f"cannot read client registry {path}: {exc}") from None
        items = data.get("clients") if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise ClientConfigError(f'{path}: expected an object with a "clients" list')
        registry = cls()
        for item in items:
            try:
                registry.register(Client.from_dict(item, base_dir=path.parent))
            except MissingKeysError as exc:
                log.warning("client skipped until its keys exist: %s", exc)
        return registry
