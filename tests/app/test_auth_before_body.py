"""Issue 11 item 5: no work before auth, and no upload may hold a connection forever.

These need a real HTTP server (the test client hands the app the whole body at once), so the
app runs under uvicorn in a thread and the tests speak raw HTTP/1.1 over a socket: they send
only the headers of a 150 MB upload and expect the answer before sending a byte of it.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from fastapi import FastAPI

from app.main import create_app
from tests.app.conftest import new_key

BIG = 150 * 1024 * 1024


@pytest.fixture
def live(make_settings) -> Iterator[tuple[FastAPI, int]]:
    app = create_app(make_settings(body_timeout_s=1.5, max_request_mb=400, max_upload_mb=300))
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield app, port
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def _send_headers(port: int, path: str, headers: dict[str, str], length: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    lines = [f"POST {path} HTTP/1.1", "Host: localhost", f"Content-Length: {length}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def _status(sock: socket.socket, timeout: float) -> tuple[int, float, bytes]:
    sock.settimeout(timeout)
    started = time.monotonic()
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        pytest.fail(f"no answer within {timeout} s (the server is waiting for the body)")
    finally:
        elapsed = time.monotonic() - started
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1") else 0
    return status, elapsed, data


MULTIPART = {"Content-Type": "multipart/form-data; boundary=xyz"}


def test_no_key_is_401_before_the_body_is_read(live) -> None:
    _app, port = live
    sock = _send_headers(port, "/references", MULTIPART, BIG)
    try:
        status, elapsed, raw = _status(sock, timeout=5)
    finally:
        sock.close()
    assert status == 401, raw[:300]
    assert elapsed < 5


def test_bad_key_and_low_role_are_refused_before_the_body(live) -> None:
    app, port = live
    reader = new_key(app, "reader")
    for key, expected in (("not-a-key", 401), (reader, 403)):
        sock = _send_headers(port, "/references", {**MULTIPART, "X-API-Key": key}, BIG)
        try:
            status, _elapsed, raw = _status(sock, timeout=5)
        finally:
            sock.close()
        assert status == expected, raw[:300]


def test_stalled_upload_gets_408_and_frees_the_connection(live) -> None:
    app, port = live
    clinician = new_key(app, "clinician")
    sock = _send_headers(port, "/references", {**MULTIPART, "X-API-Key": clinician}, 10_000)
    try:
        sock.sendall(b'--xyz\r\nContent-Disposition: form-data; name="label"\r\n\r\nx\r\n')
        status, elapsed, raw = _status(sock, timeout=10)  # then nothing more is sent
    finally:
        sock.close()
    assert status == 408, raw[:300]
    assert b"CXR_BODY_TIMEOUT_S" in raw or elapsed >= 1.0


def test_authorised_upload_still_works_over_http(live, make_xray) -> None:
    import httpx

    app, port = live
    clinician = new_key(app, "clinician")
    response = httpx.post(
        f"http://127.0.0.1:{port}/references",
        headers={"X-API-Key": clinician},
        data={"label": "disc"},
        files={"file": ("x.png", make_xray("disc", seed=1), "image/png")},
        timeout=30,
    )
    assert response.status_code == 201, response.text
