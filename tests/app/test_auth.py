"""Authentication and roles over every route of the spec.

No key, an unknown key and a revoked key get 401 (with WWW-Authenticate) on every protected
route; each role gets 403 exactly where the spec says its role is too low, and otherwise a
status that is neither 401 nor 403. Requests are built so that an allowed caller gets a cheap,
harmless answer (unknown ids, invalid bodies): the matrix tests auth, not the handlers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.auth import require_role
from app.config import Settings
from app.db import ApiKey
from app.main import create_app
from app.services.keys import (
    authenticate_api_key,
    create_api_key,
    hash_api_key,
    revoke_api_key,
    role_allows,
)
from tests.app.conftest import ROLES, new_key, png_bytes


@dataclass(frozen=True)
class Call:
    method: str
    template: str  # as in app.routes, to skip routes another engineer has not added yet
    url: str
    role: str | None  # None: public
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.method} {self.template}"


def _upload(label: bool = False) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"files": [("file", ("x.png", png_bytes(99), "image/png"))]}
    if label:
        kwargs["data"] = {"label": "Normal"}
    return kwargs


SPEC_ROUTES = [
    Call("GET", "/health", "/health", None),
    Call("GET", "/ready", "/ready", None),
    Call("GET", "/metrics", "/metrics", None),
    Call("GET", "/", "/", None),
    Call("POST", "/predict", "/predict?explain=false", "reader", _upload()),
    Call("POST", "/references", "/references", "clinician", _upload(label=True)),
    Call("GET", "/references", "/references", "reader"),
    Call("DELETE", "/references/{reference_id}", "/references/unknown-id", "admin"),
    Call("GET", "/references/{reference_id}/image", "/references/unknown-id/image", "reader"),
    Call("GET", "/classes", "/classes", "reader"),
    # an invalid body: allowed callers get 422, and no training job is started
    Call("POST", "/admin/retrain", "/admin/retrain", "admin", {"json": {"epochs": "many"}}),
    Call("GET", "/jobs/{job_id}", "/jobs/unknown-job", "admin"),
    Call("GET", "/models", "/models", "admin"),
    Call(
        "POST",
        "/admin/models/{version}/activate",
        "/admin/models/no-such-version/activate",
        "admin",
    ),
    Call("GET", "/predictions", "/predictions", "admin"),  # audit log (web page), beyond the spec
    # not multipart/related: allowed callers get 415, nothing is predicted
    Call(
        "POST",
        "/dicomweb/studies",
        "/dicomweb/studies",
        "reader",
        {"content": b"{}", "headers": {"Content-Type": "application/json"}},
    ),
    Call("GET", "/predictions/{prediction_id}/sr", "/predictions/unknown-id/sr", "reader"),
    Call("GET", "/deliveries", "/deliveries", "admin"),
]
PROTECTED = [c for c in SPEC_ROUTES if c.role is not None]
PUBLIC = [c for c in SPEC_ROUTES if c.role is None]


def _app_routes(app: FastAPI) -> set[tuple[str, str]]:
    """(METHOD, template) of every documented route. From the OpenAPI document because
    FastAPI keeps included routers nested (`app.routes` does not list their routes)."""
    return {
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        for method in operations
    }


def _has_route(app: FastAPI, call: Call) -> bool:
    return (call.method, call.template) in _app_routes(app)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FastAPI, TestClient]]:
    """One app for the whole matrix (dozens of cases; a fresh app each would cost seconds)."""
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("auth") / "var", secret_key="matrix-secret"
    )
    app = create_app(settings)
    with TestClient(app) as client:
        yield app, client


@pytest.fixture(scope="module")
def shared_keys(shared: tuple[FastAPI, TestClient]) -> dict[str, str]:
    return {role: new_key(shared[0], role) for role in ROLES}


def _send(client: TestClient, call: Call, headers: dict[str, str] | None = None) -> Any:
    kwargs = dict(call.kwargs)
    sent = {**kwargs.pop("headers", {}), **(headers or {})}
    return client.request(call.method, call.url, headers=sent, **kwargs)


def _require_route(app: FastAPI, call: Call) -> None:
    """Every route of the spec must exist: a missing one fails the matrix, never skips it."""
    if not _has_route(app, call):
        pytest.fail(f"{call.id} is a route of the spec but the app does not serve it")


@pytest.mark.parametrize("call", PUBLIC, ids=lambda c: c.id)
def test_public_routes_need_no_key(shared: tuple[FastAPI, TestClient], call: Call) -> None:
    app, client = shared
    _require_route(app, call)
    assert _send(client, call).status_code in (200, 503)


@pytest.mark.parametrize("call", PROTECTED, ids=lambda c: c.id)
def test_bad_credentials_are_401(
    shared: tuple[FastAPI, TestClient], shared_keys: dict[str, str], call: Call
) -> None:
    app, client = shared
    keys = shared_keys
    _require_route(app, call)
    with app.state.sessionmaker() as session:
        row, revoked = create_api_key(
            session=session, role="admin", name="revoked", settings=app.state.settings
        )
        revoke_api_key(session=session, key_id=row.id)
    cases = {
        "missing": {},
        "unknown": {"X-API-Key": "cxr_" + "x" * 43},
        "unknown bearer": {"Authorization": "Bearer cxr_nope"},
        "revoked": {"X-API-Key": revoked},
        "revoked bearer": {"Authorization": f"Bearer {revoked}"},
        "empty": {"X-API-Key": "  "},
        "wrong scheme": {"Authorization": f"Basic {keys['admin']}"},
    }
    for case, headers in cases.items():
        response = _send(client, call, headers)
        assert response.status_code == 401, (case, response.text)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        detail = response.json()["detail"]
        assert isinstance(detail, str) and "key" in detail.lower(), case


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("call", PROTECTED, ids=lambda c: c.id)
def test_role_matrix(
    shared: tuple[FastAPI, TestClient], shared_keys: dict[str, str], call: Call, role: str
) -> None:
    app, client = shared
    keys = shared_keys
    _require_route(app, call)
    assert call.role is not None
    for headers in ({"X-API-Key": keys[role]}, {"Authorization": f"Bearer {keys[role]}"}):
        response = _send(client, call, headers)
        if role_allows(role, call.role):
            assert response.status_code not in (401, 403), response.text
            assert response.status_code != 500, response.text  # 503 (no model) is fine
        else:
            assert response.status_code == 403, response.text
            detail = response.json()["detail"]
            assert f"'{call.role}' role" in detail and f"'{role}' role" in detail


def test_every_spec_route_exists_or_is_listed(app: FastAPI) -> None:
    """Routes of this app that need a key are all in the matrix (no route escapes it)."""
    listed = {(c.method, c.template) for c in SPEC_ROUTES}
    extra_allowed = {("GET", "/jobs")}  # admin job listing (jobs engineer), beyond the spec
    routes = _app_routes(app)
    assert {("GET", "/health"), ("POST", "/references"), ("GET", "/classes")} <= routes
    assert routes <= listed | extra_allowed, routes - listed - extra_allowed


def test_keys_store_only_hmac(app: FastAPI, client: TestClient) -> None:
    settings = app.state.settings
    with app.state.sessionmaker() as session:
        row, plaintext = create_api_key(
            session=session, role="reader", name="ci", settings=settings
        )
        assert plaintext.startswith("cxr_") and len(plaintext) >= 40
        assert row.key_hash == hash_api_key(plaintext, secret=settings.secret_bytes)
        assert plaintext not in repr(
            [(k.key_hash, k.prefix, k.name) for k in session.query(ApiKey)]
        )
        assert row.prefix == plaintext[:10]
        found = authenticate_api_key(session=session, key=plaintext, settings=settings)
        assert found is not None and found.id == row.id and found.last_used_at is not None
        # another secret: the same key does not authenticate (the hash is peppered)
        other = settings.model_copy(update={"secret_key": type(settings.secret_key)("other")})
        assert authenticate_api_key(session=session, key=plaintext, settings=other) is None
    with pytest.raises(ValueError, match="role"), app.state.sessionmaker() as session:
        create_api_key(session=session, role="root", settings=settings)


def test_revocation_takes_effect_immediately(client: TestClient, app: FastAPI) -> None:
    key = new_key(app, "reader")
    assert client.get("/classes", headers={"X-API-Key": key}).status_code == 200
    with app.state.sessionmaker() as session:
        row = authenticate_api_key(session=session, key=key, settings=app.state.settings)
        assert row is not None
        revoke_api_key(session=session, key_id=row.id)
    assert client.get("/classes", headers={"X-API-Key": key}).status_code == 401


def test_require_role_is_memoised_and_validated() -> None:
    dependency: Callable[..., ApiKey] = require_role("clinician")
    assert require_role("clinician") is dependency
    with pytest.raises(ValueError, match="unknown role"):
        require_role("superuser")
