"""`cxr quickstart`: from nothing to a serving deployment on the embedded default, in stages.

1. **train** the shipped recipe on the sources (or take the given checkpoint),
2. **register** the checkpoint as a model version and activate it,
3. **enroll** the train split of the sources as references,
4. **admin key**: create one (its plaintext is returned once, never stored),

and then the CLI serves and prints the page's URL. `run_quickstart` does stages 1-4 and is what
the command and the tests call.

Resumable: the state (which stages are done, the model version, the admin key's id, never the
key) is kept in `CXR_DATA_DIR/quickstart.json`, written after every stage. Rerunning skips the
done stages; an interrupted training resumes from its last epoch (`TrainConfig.resume`); an
interrupted enrollment re-imports and counts what is already there as duplicates.

Safe: a data directory that holds another deployment (another quickstart's sources or
checkpoint, or models, references or keys made by hand) is refused with what to do, so a
quickstart never mixes its references or keys into someone else's service.

The split is the training split: the sources are loaded and split once, here, with the recipe's
fractions and seed, and the same lists are given to `train(samples=...)` and to enrollment, so
no test or validation image ever becomes a reference.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from app.config import Settings
from app.db import ApiKey, Model, Reference
from app.files import atomic_write_bytes

logger = logging.getLogger(__name__)

STAGES = ("train", "register", "enroll", "admin_key")
STATE_FILE = "quickstart.json"
#: Everything quickstart writes besides the database and the service's own folders.
WORK_DIR = "quickstart"

#: progress(stage, done, total): `total` None while unknown; `done == total` when finished.
ProgressFn = Callable[[str, float, float | None], None]


class QuickstartError(RuntimeError):
    """The quickstart cannot go on; the message says what to do."""


class OtherDeploymentError(QuickstartError):
    """CXR_DATA_DIR already holds a different deployment."""


@dataclass
class QuickstartResult:
    model_version: str
    checkpoint: Path
    admin_key: str | None  # None when an earlier run already created (and printed) it
    admin_key_id: int
    references: dict[str, int]  # enrolled / duplicates / skipped / total of the last import
    skipped_stages: list[str] = field(default_factory=list)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(sources: Sequence[Path], checkpoint: Path | None) -> dict[str, Any]:
    """What makes two quickstarts the same deployment: the sources and the checkpoint's bytes."""
    return {
        "sources": [str(Path(s).expanduser().resolve()) for s in sources],
        "checkpoint_sha256": _file_sha256(checkpoint) if checkpoint is not None else None,
    }


def _load_state(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise QuickstartError(
            f"{path} is unreadable ({exc}); remove it to start the quickstart over"
        ) from exc


def _save_state(path: Path, state: Mapping[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(state, indent=2) + "\n").encode("utf-8"))


def _deployment_counts(session: Any) -> dict[str, int]:
    return {
        name: int(session.execute(select(func.count()).select_from(table)).scalar_one())
        for name, table in (("models", Model), ("references", Reference), ("keys", ApiKey))
    }


def _check_same_deployment(
    state: Mapping[str, Any] | None, wanted: Mapping[str, Any], counts: Mapping[str, int], *,
    data_dir: Path,
) -> None:  # fmt: skip
    if state is not None:
        if state.get("fingerprint") != wanted:
            raise OtherDeploymentError(
                f"CXR_DATA_DIR={data_dir} already holds a quickstart deployment of other data "
                f"(sources {state.get('fingerprint', {}).get('sources')}, checkpoint sha256 "
                f"{state.get('fingerprint', {}).get('checkpoint_sha256')}); rerun with the same "
                "--data and --checkpoint to resume it, or point CXR_DATA_DIR at an empty folder"
            )
        return
    if any(counts.values()):
        held = ", ".join(f"{n} {name}" for name, n in counts.items() if n)
        raise OtherDeploymentError(
            f"CXR_DATA_DIR={data_dir} already holds a deployment not made by quickstart "
            f"({held}); point CXR_DATA_DIR at an empty folder for the quickstart, or keep using "
            "this one with `cxr serve`"
        )


def load_train_split(sources: Sequence[Path], config: Any) -> dict[str, list[Any]]:
    """Load every source and split with the recipe's fractions and seed (train/val/test)."""
    from training.data import load_sources, split_samples

    return split_samples(
        load_sources([Path(src) for src in sources]),
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        seed=config.seed,
    )


def _write_manifest(path: Path, samples: Sequence[Any]) -> Path:
    """The train split as a `path,label,split,patient_id` manifest, for the bulk importer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split", "patient_id"])
        for s in samples:
            writer.writerow([str(Path(s.path).resolve()), s.label, "train", s.patient_id or ""])
    tmp.replace(path)
    return path


def run_quickstart(
    *,
    settings: Settings,
    sources: Sequence[Path],
    checkpoint: Path | None = None,
    train_overrides: Mapping[str, Any] | None = None,
    progress: ProgressFn | None = None,
) -> QuickstartResult:
    """Stages 1-4 (see the module docstring); resumes from `CXR_DATA_DIR/quickstart.json`.

    `train_overrides` change the recipe (`TrainConfig` fields such as `epochs`); the defaults
    are the shipped recipe. Raises `OtherDeploymentError`, `QuickstartError`, and the data and
    checkpoint errors of `training` (all `ValueError` or `FileNotFoundError`).
    """
    from app.db.migrate import prepare_database
    from app.services.keys import create_api_key
    from app.services.models import register_model
    from app.services.references import import_references
    from training.train import TrainConfig

    report: ProgressFn = progress or (lambda _stage, _done, _total: None)
    if not sources:
        raise QuickstartError("give at least one --data SRC (an image folder or a manifest)")
    for src in sources:
        if not Path(src).exists():
            raise FileNotFoundError(f"--data {src} does not exist")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint} does not exist")

    data_dir = settings.data_dir
    state_path = data_dir / STATE_FILE
    work = data_dir / WORK_DIR
    wanted = fingerprint(sources, checkpoint)
    state = _load_state(state_path)
    factory = prepare_database(settings)
    try:
        with factory() as session:
            _check_same_deployment(state, wanted, _deployment_counts(session), data_dir=data_dir)
        if state is None:
            state = {"fingerprint": wanted, "done": []}
            _save_state(state_path, state)
        done: list[str] = state.setdefault("done", [])
        skipped = [stage for stage in STAGES if stage in done]

        # Source paths travel as a list (multi-source training, issue 10).
        config = TrainConfig(
            **{
                **dict(train_overrides or {}),
                "data": [str(Path(s).expanduser().resolve()) for s in sources],  # type: ignore[dict-item]
                "out": str(work / "run"),
                "progress_bar": False,
            }
        )
        loaded: dict[str, list[Any]] = {}

        def splits() -> dict[str, list[Any]]:
            if not loaded:
                loaded.update(load_train_split(sources, config))
                if not loaded["train"]:
                    raise QuickstartError(f"the sources {[str(s) for s in sources]} hold no images")
            return loaded

        # 1. train (or take the checkpoint) ---------------------------------------------------
        if checkpoint is not None:
            trained = Path(checkpoint).expanduser().resolve()
            report("train", 1, 1)
        elif "train" in done and Path(state.get("checkpoint", "")).is_file():
            trained = Path(state["checkpoint"])
            report("train", 1, 1)
        else:
            from training.train import train

            config.resume = (work / "run" / "last.pt").is_file()
            if config.resume:
                logger.info("resuming the interrupted training from %s", work / "run")
            report("train", 0, 1)
            result = train(config, samples=splits(), progress=lambda f: report("train", f, 1))
            trained = result.checkpoint
            report("train", 1, 1)
        state["checkpoint"] = str(trained)
        _mark(state, "train", state_path)

        # 2. register and activate (once: a rerun must not undo an admin's later rollback) -----
        if "register" in done and state.get("model_version"):
            version = state["model_version"]
            report("register", 1, 1)
        else:
            report("register", 0, 1)
            with factory() as session:
                version = register_model(
                    session=session,
                    checkpoint=trained,
                    settings=settings,
                    activate=True,
                    source="quickstart",
                ).version
            state["model_version"] = version
            _mark(state, "register", state_path)
            report("register", 1, 1)

        # 3. enroll the train split (an interrupted import reruns; done files are duplicates) ---
        if "enroll" in done and "references" in state:
            references = state["references"]
            report("enroll", 1, 1)
        else:
            # One import per source, under its name: the retrain balances label x source, so
            # the references must say which pack (hospital) each came from.
            train_split = splits()["train"]
            names = sorted({str(x.source or "") for x in train_split})
            totals = {"total": 0, "enrolled": 0, "duplicates": 0, "skipped": 0}
            for i, name in enumerate(names):
                part = [x for x in train_split if str(x.source or "") == name]
                manifest = _write_manifest(work / f"train_split_{i}.csv", part)
                with factory() as session:
                    imported = import_references(
                        session=session,
                        source=manifest,
                        settings=settings,
                        progress=lambda d, t, base=totals["total"]: report(
                            "enroll", base + d, len(train_split)
                        ),
                        source_name=name or None,
                    )
                for key, value in dataclasses.asdict(imported).items():
                    totals[key] += value
            references = totals
            state["references"] = references
            _mark(state, "enroll", state_path)

        # 4. one admin key, printed once --------------------------------------------------------
        report("admin_key", 0, 1)
        plaintext: str | None = None
        key_id = state.get("admin_key_id")
        with factory() as session:
            if key_id is None or session.get(ApiKey, key_id) is None:
                row, plaintext = create_api_key(
                    session=session, role="admin", name="quickstart", settings=settings
                )
                key_id = row.id
        state["admin_key_id"] = key_id
        _mark(state, "admin_key", state_path)
        report("admin_key", 1, 1)
    finally:
        factory.kw["bind"].dispose()
    logger.info(
        "quickstart ready",
        extra={"model_version": version, "references": references, "skipped": skipped},
    )
    return QuickstartResult(
        model_version=version,
        checkpoint=trained,
        admin_key=plaintext,
        admin_key_id=int(key_id),
        references=references,
        skipped_stages=skipped,
    )


def _mark(state: dict[str, Any], stage: str, path: Path) -> None:
    if stage not in state["done"]:
        state["done"].append(stage)
    _save_state(path, state)
