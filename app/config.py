"""Service settings: one pydantic-settings `Settings`, read from `CXR_*` environment variables.

Every entry point (the HTTP app, each `cxr` command, workers, tests) builds its settings through
`get_settings()` or passes a `Settings` explicitly, so they all honour the same variables.
`get_settings()` is deliberately *not* cached: tests and CLI runs change the environment between
calls and must see the change; building a `Settings` is cheap.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The secret used when none is configured. Fine for a laptop, refused in production: API key
#: hashes are HMACs keyed with it, so a known secret would make a stolen database brute-forceable.
DEFAULT_SECRET_KEY = "cxr-development-secret-change-me"
#: Production secrets shorter than this are refused: API key hashes are HMACs keyed with it.
MIN_PRODUCTION_SECRET_LENGTH = 32

Role = Literal["reader", "clinician", "admin"]
ROLES: tuple[Role, ...] = ("reader", "clinician", "admin")


class InsecureSettingsError(RuntimeError):
    """Raised when production mode is configured with a default or empty secret."""


class Settings(BaseSettings):
    """All service settings. Environment variables use the `CXR_` prefix (`CXR_DATA_DIR`, ...)."""

    model_config = SettingsConfigDict(
        env_prefix="CXR_", env_file=None, extra="ignore", validate_default=True
    )

    environment: Literal["development", "production"] = "development"
    data_dir: Path = Field(
        default=Path("var"), description="Images, checkpoints, the SQLite DB and the index."
    )
    database_url: str = Field(
        default="",
        description="SQLAlchemy URL; empty means SQLite at {data_dir}/cxr.db (embedded default).",
    )
    broker_url: str | None = Field(
        default=None, description="Celery broker (e.g. redis://...); unset = in-process jobs."
    )
    secret_key: SecretStr = Field(
        default=SecretStr(DEFAULT_SECRET_KEY),
        description="HMAC pepper for API key hashes. Must be set (non-default) in production.",
    )
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    max_upload_mb: float = Field(default=20.0, gt=0, description="Per-file upload limit (MB).")
    max_request_mb: float = Field(
        default=200.0, gt=0, description="Whole request body limit (MB), multipart included."
    )
    max_files_per_request: int = Field(default=64, ge=1)
    max_pixels: int = Field(default=50_000_000, ge=1, description="Decoded width x height limit.")
    max_decode_mb: float = Field(
        default=320.0,
        gt=0,
        description="Memory one image decode may take (MB): estimated from the header (size, "
        "bit depth, channels, format) and refused with 413 before decoding when over.",
    )
    min_image_side: int = Field(
        default=32, ge=1, description="Shorter side below this: 422 (no diagnosis on a thumbnail)."
    )
    max_aspect_ratio: float = Field(
        default=4.0, ge=1.0, description="Longer/shorter side above this: 422 (not a radiograph)."
    )
    body_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="Seconds a request body may take to arrive; a stalled upload gets 408.",
    )
    ood_check: bool = Field(
        default=True,
        description="Flag images that do not look like a chest radiograph as unknown.",
    )
    store_prediction_images: bool = Field(
        default=False, description="Keep uploaded prediction images (audit). Off: no PHI at rest."
    )
    default_k: int = Field(default=5, ge=1, le=100)
    unknown_quantile: float = Field(default=0.95, gt=0, le=1)
    index_factory: str = Field(default="auto", description="FAISS index factory for the index.")
    log_level: str = Field(default="INFO")
    log_json: bool = Field(default=True, description="JSON log lines (False: human-readable).")
    auto_migrate: bool = Field(
        default=True,
        description="Bring the schema to head at startup and in every CLI command (idempotent).",
    )
    inference_workers: int | None = Field(
        default=None,
        ge=1,
        description="Predictions whose CPU work may run at once; unset: min(4, CPU count).",
    )
    onnx: Literal["auto", "off"] = Field(
        default="auto",
        description="auto: the CPU encoder's plain forward runs in ONNX Runtime (exported once "
        "per checkpoint, checked against torch; Grad-CAM and CUDA stay on torch). off: torch.",
    )
    predict_batch_max: int = Field(
        default=1,
        ge=1,
        le=256,
        description="Images per micro-batched forward of concurrent predictions (1: no batching; "
        "on a small CPU single forwards in parallel were faster, see docs/BENCHMARKS.md).",
    )
    predict_batch_wait_ms: float = Field(
        default=0.0,
        ge=0,
        le=100,
        description="How long a micro-batch waits for more requests (0: only those queued).",
    )

    # -- job system (read through `app.jobs.options.JobOptions.from_settings`) ------------------
    jobs_queue: str = Field(
        default="cxr.jobs",
        min_length=1,
        description="Celery queue the API publishes to and `cxr worker` consumes.",
    )
    job_heartbeat_s: float = Field(
        default=10.0, gt=0, description="How often a running job writes `jobs.heartbeat_at`."
    )
    job_stale_after_s: float = Field(
        default=120.0, gt=0, description="A `running` job silent this long is marked `failed`."
    )
    job_requeue_after_s: float = Field(
        default=300.0, ge=0, description="A `queued` job nobody started is re-published this often."
    )
    job_queued_max_age_s: float = Field(
        default=86_400.0, gt=0, description="A `queued` job older than this is marked `failed`."
    )
    job_reap_interval_s: float = Field(
        default=30.0, gt=0, description="How often each API process runs the job reaper."
    )
    job_progress_interval_s: float = Field(
        default=1.0, ge=0, description="Minimum seconds between two progress writes."
    )
    # Must exceed the longest retrain: Redis hands an unacknowledged message to another worker
    # after this long. A duplicate delivery is harmless (the task only claims `queued` jobs), but
    # a short timeout would make every long retrain look lost.
    celery_visibility_timeout_s: float = Field(
        default=6 * 3600.0, gt=0, description="Redis redelivers an unacked message after this."
    )

    # -- DICOM (read by `app.dicom`) -------------------------------------------------------------
    dicom_destination: str | None = Field(
        default=None,
        description="DICOM node that receives SRs and overlays by C-STORE: AET@host:port.",
    )
    dicomweb_url: str | None = Field(
        default=None,
        description="DICOMweb base URL that receives SRs and overlays by STOW-RS "
        "(e.g. http://pacs:8042/dicom-web); used when CXR_DICOM_DESTINATION is unset.",
    )
    dicom_ae_title: str = Field(
        default="CXR", min_length=1, max_length=16, description="Our AE title (listener, SCU)."
    )
    dicom_port: int = Field(default=11112, ge=1, le=65535, description="C-STORE SCP port.")
    dicom_delivery_attempts: int = Field(
        default=10, ge=1, description="Deliveries tried this often before they end `failed`."
    )
    dicom_delivery_backoff_s: float = Field(
        default=2.0, gt=0, description="First retry delay; doubled after every failure."
    )
    dicom_delivery_max_backoff_s: float = Field(
        default=300.0, gt=0, description="Longest delay between two delivery attempts."
    )
    dicom_delivery_poll_s: float = Field(
        default=1.0, gt=0, description="How often the delivery worker looks for due results."
    )
    dicom_timeout_s: float = Field(
        default=30.0, gt=0, description="Network timeout of one delivery (C-STORE or STOW-RS)."
    )

    @field_validator("dicom_destination", "dicomweb_url", mode="before")
    @classmethod
    def _blank_destination_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("dicom_destination")
    @classmethod
    def _check_destination(cls, value: str | None) -> str | None:
        if value is not None:
            from app.dicom.destination import parse_dicom_destination

            parse_dicom_destination(value)  # raises ValueError saying what the form is
        return value

    @field_validator("inference_workers", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        # `CXR_INFERENCE_WORKERS=` (empty, as compose files write an unset knob) means default.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("log_level")
    @classmethod
    def _upper_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return level

    @model_validator(mode="after")
    def _resolve(self) -> Settings:
        # Absolute, so a later chdir (uvicorn workers, tests) cannot move the data.
        self.data_dir = self.data_dir.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'cxr.db'}"
        # Plain postgres URLs (as PaaS and compose files write them) would pick psycopg2, which
        # is not installed: use the psycopg 3 driver this project ships.
        for plain in ("postgres://", "postgresql://"):
            if self.database_url.startswith(plain):
                self.database_url = "postgresql+psycopg://" + self.database_url[len(plain) :]
        if self.environment == "production":
            self.check_production()
        return self

    def check_production(self) -> None:
        """Refuse insecure production configurations with a message saying what to set."""
        secret = self.secret_key.get_secret_value().strip()
        if len(secret) < MIN_PRODUCTION_SECRET_LENGTH or secret == DEFAULT_SECRET_KEY:
            raise InsecureSettingsError(
                "CXR_ENVIRONMENT=production refuses to start with a default, empty or short "
                f"secret (under {MIN_PRODUCTION_SECRET_LENGTH} characters): set CXR_SECRET_KEY "
                "to a long random value (e.g. `python -c 'import secrets; "
                "print(secrets.token_urlsafe(48))'`). Existing API keys are bound to the secret."
            )

    # -- derived values ------------------------------------------------------------------------
    @property
    def effective_inference_workers(self) -> int:
        """`inference_workers`, or min(4, CPU count) when it is unset."""
        return self.inference_workers or min(4, os.cpu_count() or 1)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_decode_bytes(self) -> int:
        return int(self.max_decode_mb * 1024 * 1024)

    @property
    def max_request_bytes(self) -> int:
        return max(int(self.max_request_mb * 1024 * 1024), self.max_upload_bytes + 64 * 1024)

    @property
    def references_dir(self) -> Path:
        return self.data_dir / "references"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def predictions_dir(self) -> Path:
        return self.data_dir / "predictions"

    @property
    def secret_bytes(self) -> bytes:
        return self.secret_key.get_secret_value().encode("utf-8")


def get_settings(**overrides: object) -> Settings:
    """Settings from the environment (plus explicit overrides); a fresh object on every call."""
    return Settings(**overrides)  # type: ignore[arg-type]
