"""Property-based API tests from the OpenAPI schema (Schemathesis 4): no input, valid or not,
makes the service answer 5xx; the prediction and model endpoints also answer what the schema
documents (status codes, content types, bodies).

The app has a registered model and enrolled references, and every request carries a valid admin
key, so generated cases reach the handlers instead of stopping at 401/503.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks as st_checks

from app.config import Settings
from app.main import create_app
from tests.app.conftest_predict import make_test_checkpoint, synthetic_xray

MAX_EXAMPLES = 12
ADMIN_KEY: dict[str, str] = {}

# The schema must exist when the module is collected (to parametrize the tests), so the app is
# built here from settings of its own; nothing touches the disk until the fixture below runs.
# (`schemathesis.pytest.from_fixture` does not work with this pytest version.)
_DATA_DIR = Path(tempfile.mkdtemp(prefix="cxr-schemathesis-"))
_SETTINGS = Settings(
    data_dir=_DATA_DIR / "var",
    secret_key="schemathesis-test-secret",
    device="cpu",
    log_level="WARNING",
)
app = create_app(_SETTINGS)
schema = schemathesis.openapi.from_dict(app.openapi())
schema.app = app
# Retraining would start a real training job in-process; it has its own tests.
schema = schema.exclude(path="/admin/retrain")


@pytest.fixture(scope="module", autouse=True)
def service_state() -> Iterator[None]:
    """Model, references and an admin key in the app's database (before its first request,
    which starts the app's lifespan inside Schemathesis's ASGI client)."""
    from app.db.migrate import prepare_database
    from app.services.keys import create_api_key
    from app.services.models import register_model
    from app.services.references import enroll_references

    checkpoint = make_test_checkpoint(_DATA_DIR / "model.pt", seed=0)
    factory = prepare_database(_SETTINGS)
    try:
        with factory() as session:
            register_model(
                session=session, checkpoint=checkpoint, settings=_SETTINGS, activate=True
            )
            for kind in ("disc", "stripes"):
                files = [(f"{kind}{i}.png", synthetic_xray(kind, seed=i)) for i in range(3)]
                enroll_references(
                    session=session, files=files, label=kind, enrolled_by=None, settings=_SETTINGS
                )
            _row, key = create_api_key(session=session, role="admin", settings=_SETTINGS)
            ADMIN_KEY["X-API-Key"] = key
    finally:
        factory.kw["bind"].dispose()
    yield
    shutil.rmtree(_DATA_DIR, ignore_errors=True)


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_server_errors(case: schemathesis.Case) -> None:
    case.call_and_validate(headers=dict(ADMIN_KEY), checks=[st_checks.not_a_server_error])


@schema.include(path_regex=r"^/(predict|models|admin/models/.*)$").parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_prediction_endpoints_conform(case: schemathesis.Case) -> None:
    case.call_and_validate(
        headers=dict(ADMIN_KEY),
        checks=[
            st_checks.not_a_server_error,
            st_checks.status_code_conformance,
            st_checks.content_type_conformance,
            st_checks.response_schema_conformance,
        ],
    )
