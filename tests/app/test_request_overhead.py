"""What a request costs besides its own work: thread hand-offs and pooled connections.

FastAPI runs every plain `def` dependency in the worker-thread pool; `POST /predict` used to make
nine thread hand-offs (settings, service, metrics, key, role, session enter and exit, the key
lookup before the body, the inference), each a GIL round trip that under concurrent clients
stretched the latency of all of them. Only the two that do blocking work are left. The session
dependency closes without a thread when it holds no connection, and must still give back every
connection it took, whatever the route did with it.
"""

from __future__ import annotations

from typing import Any

import anyio.to_thread
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.app.conftest_predict import post_predict, synthetic_xray


@pytest.fixture
def hand_offs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the functions sent to a worker thread (FastAPI, Starlette and the app
    all go through `anyio.to_thread.run_sync`)."""
    calls: list[str] = []
    original = anyio.to_thread.run_sync

    async def counting(func: Any, *args: Any, **kwargs: Any) -> Any:
        target = getattr(func, "func", func)  # functools.partial
        calls.append(getattr(target, "__qualname__", type(target).__name__))
        return await original(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
    return calls


def test_predict_hands_off_only_the_key_lookup_and_the_inference(
    client: TestClient,
    headers: dict[str, dict[str, str]],
    enrolled: dict,
    hand_offs: list[str],
) -> None:
    image = synthetic_xray("disc", seed=7)
    assert post_predict(client, headers["reader"], image, explain=False).status_code == 200
    hand_offs.clear()
    response = post_predict(client, headers["reader"], image, explain=False)
    assert response.status_code == 200, response.text
    assert len(hand_offs) == 2, hand_offs
    assert hand_offs[-1] == "predict"


def test_get_with_a_key_looks_it_up_in_one_hand_off(
    client: TestClient, headers: dict[str, dict[str, str]], hand_offs: list[str]
) -> None:
    """Without a body there is no pre-authentication: the key is looked up by the (async)
    dependency, in a worker thread, and still refused or accepted as before."""
    assert client.get("/classes", headers={"X-API-Key": "cxr_unknown"}).status_code == 401
    hand_offs.clear()
    response = client.get("/classes", headers=headers["reader"])
    assert response.status_code == 200, response.text
    assert "resolve_key" in hand_offs


def test_every_request_gives_its_connection_back(
    client: TestClient, app: FastAPI, headers: dict[str, dict[str, str]], enrolled: dict
) -> None:
    """Sessions that queried (key lookups, sync routes, predictions), refused requests and
    errors alike leave no connection checked out of the pool."""
    pool = app.state.engine.pool
    image = synthetic_xray("stripes", seed=9)
    for _ in range(3):
        assert client.get("/classes", headers=headers["reader"]).status_code == 200
        assert client.get("/classes", headers={"X-API-Key": "cxr_nope"}).status_code == 401
        assert client.get("/predictions", headers=headers["reader"]).status_code == 403
        assert client.get("/predictions", headers=headers["admin"]).status_code == 200
        assert post_predict(client, headers["reader"], image, explain=False).status_code == 200
        assert post_predict(client, headers["reader"], b"not an image").status_code in (400, 415)
    assert pool.checkedout() == 0
