"""The session, typed: what one browser's launch holds server-side, and how it goes in and out of the store.

Two kinds of entry live in the ``SessionStore`` (as JSON, under keys the app mints):

- ``sid:<session id>`` -> ``LaunchState``: the issuer and its configuration
  from ``/launch``; after ``/callback`` also the token, the launch context,
  the granted scopes and the CSRF token; later the EHR's style values.
- ``state:<state>`` -> ``PendingAuthorization``: the PKCE verifier and redirect
  URI of a launch in flight, bound to the session that started it
  (SMART App Launch 2.x, app-launch.html: ``state`` and PKCE).

The JSON keys are the ones the app has always stored, so a store written
before this module still reads.  Nothing outside this module touches a key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ._launch import LaunchContext, SmartConfig, can_write_drafts, missing_write_scopes
from ._store import SessionStore

__all__ = ["LaunchState", "PendingAuthorization", "LaunchSession", "Sessions"]


@dataclass(frozen=True)
class PendingAuthorization:
    """What ``/callback`` needs to finish a launch, kept under ``state:<state>`` until used once."""

    sid: str
    code_verifier: str = field(repr=False)
    redirect_uri: str
    #: the launch's public handle (its cookie's name and its pages' ``launch`` parameter)
    lid: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "sid": self.sid,
            "code_verifier": self.code_verifier,
            "redirect_uri": self.redirect_uri,
            "lid": self.lid,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PendingAuthorization:
        return cls(
            sid=str(data.get("sid")),
            code_verifier=str(data.get("code_verifier") or ""),
            redirect_uri=str(data.get("redirect_uri") or ""),
            lid=str(data.get("lid") or ""),
        )


@dataclass(frozen=True)
class LaunchState:
    """One browser's launch.  ``state`` is set while the authorization is pending, ``token`` once signed in."""

    iss: str
    config: SmartConfig
    requested_scope: str
    standalone: bool
    started: float
    #: the OAuth ``state`` of the pending authorization; None once the callback used it
    state: str | None = None
    token: Mapping[str, Any] | None = field(default=None, repr=False)
    context: LaunchContext | None = None
    csrf: str | None = field(default=None, repr=False)
    scopes: tuple[str, ...] = ()
    #: the EHR's safe style values (``smart_style_url``); None until fetched, {} when there were none
    style: Mapping[str, str] | None = None
    #: the launch's public handle: one session per launch, so two launches in a browser never mix patients
    lid: str | None = None

    @property
    def signed_in(self) -> bool:
        return self.token is not None and self.context is not None and self.context.patient is not None

    def signed(
        self, *, token: Mapping[str, Any], context: LaunchContext, csrf: str, scopes: tuple[str, ...]
    ) -> LaunchState:
        """This launch after the token exchange: the pending ``state`` is spent."""
        return replace(self, state=None, token=dict(token), context=context, csrf=csrf, scopes=scopes)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "iss": self.iss,
            "config": self.config.to_json(),
            "requested_scope": self.requested_scope,
            "standalone": self.standalone,
            "started": self.started,
        }
        if self.state is not None:
            out["state"] = self.state
        if self.token is not None:
            out["token"] = dict(self.token)
        if self.context is not None:
            out["context"] = self.context.to_json()
        if self.csrf is not None:
            out["csrf"] = self.csrf
        out["scopes"] = list(self.scopes)
        if self.style is not None:
            out["style"] = dict(self.style)
        if self.lid is not None:
            out["lid"] = self.lid
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LaunchState:
        context = data.get("context")
        style = data.get("style")
        return cls(
            iss=str(data["iss"]),
            config=SmartConfig.from_json(data["config"]),
            requested_scope=str(data.get("requested_scope") or ""),
            standalone=bool(data.get("standalone")),
            started=float(data.get("started") or 0),
            state=data.get("state"),
            token=data.get("token"),
            context=LaunchContext.from_json(context) if isinstance(context, dict) else None,
            csrf=data.get("csrf"),
            scopes=tuple(data.get("scopes") or ()),
            style={str(k): str(v) for k, v in style.items()} if isinstance(style, dict) else None,
            lid=str(data["lid"]) if data.get("lid") else None,
        )


@dataclass(frozen=True)
class LaunchSession:
    """A signed-in session as the handlers see it: its id and its state, with the questions they ask."""

    sid: str
    state: LaunchState

    @property
    def lid(self) -> str | None:
        return self.state.lid

    @property
    def context(self) -> LaunchContext:
        assert self.state.context is not None  # a LaunchSession is only made for a signed-in state
        return self.state.context

    @property
    def patient(self) -> str:
        return str(self.context.patient)

    @property
    def encounter(self) -> str | None:
        return self.context.encounter

    @property
    def scopes(self) -> tuple[str, ...]:
        return self.state.scopes

    @property
    def csrf(self) -> str:
        return self.state.csrf or ""

    @property
    def write_allowed(self) -> bool:
        return can_write_drafts(self.scopes)

    @property
    def missing_write_scopes(self) -> list[str]:
        return missing_write_scopes(self.scopes)


class Sessions:
    """Typed access to the ``SessionStore``: the only code that knows the keys it uses."""

    def __init__(self, store: SessionStore) -> None:
        self.store = store

    def get(self, sid: str | None) -> LaunchState | None:
        data = self.store.get(f"sid:{sid}") if sid else None
        return LaunchState.from_json(data) if data else None

    def put(self, sid: str, state: LaunchState, *, ttl: float) -> None:
        self.store.set(f"sid:{sid}", state.to_json(), ttl=ttl)

    def remove(self, sid: str) -> None:
        self.store.unset(f"sid:{sid}")

    def drop(self, sid: str | None) -> None:
        """Forget a session and the authorization it may still have pending (a new launch clears the old)."""
        if not sid:
            return
        old = self.get(sid)
        if old and old.state:
            self.store.unset(f"state:{old.state}")
        self.store.unset(f"sid:{sid}")

    def pending(self, state: str) -> PendingAuthorization | None:
        data = self.store.get(f"state:{state}")
        return PendingAuthorization.from_json(data) if data is not None else None

    def put_pending(self, state: str, pending: PendingAuthorization, *, ttl: float) -> None:
        self.store.set(f"state:{state}", pending.to_json(), ttl=ttl)

    def take_pending(self, state: str) -> bool:
        """Spend a pending ``state``: True for the one caller that removed it (the store's ``unset`` decides)."""
        return self.store.unset(f"state:{state}")
