"""Importers for the four data sources of the product contract, each returning ``Sample`` lists.

Accepted sources (``src`` may be the folder or the CSV file itself):

1. an image folder: ``CLASS/*.png`` or ``SPLIT/CLASS/*`` (``SPLIT`` in train/val/test;
   ``validation``/``valid`` mean val);
2. a CSV manifest ``path,label[,split][,patient_id]``, paths relative to the CSV's folder;
3. the CoronaHack folder with ``Chest_xray_Corona_Metadata.csv``;
4. the COVID-19 image data collection (``metadata.csv`` with ``finding``, ``view``,
   ``modality``, ``filename``, ``patientid``; images under ``images/``).

Files named by a source but missing on disk are counted, named in one warning and dropped.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from training.data.samples import DataSourceError, Sample, class_counts, name_some

logger = logging.getLogger(__name__)

__all__ = [
    "ACCEPTED_SOURCES",
    "IMAGE_EXTENSIONS",
    "load_source",
    "load_sources",
    "source_name",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".dcm", ".dicom"})
CORONAHACK_CSV = "Chest_xray_Corona_Metadata.csv"
COVID_COLLECTION_CSV = "metadata.csv"

ACCEPTED_SOURCES = """\
accepted data sources:
  1. an image folder: CLASS/*.png|jpg|dcm, or SPLIT/CLASS/* with SPLIT in train, val, test
  2. a CSV manifest with columns path,label[,split][,patient_id] (paths relative to the CSV)
  3. the CoronaHack folder containing Chest_xray_Corona_Metadata.csv
  4. the COVID-19 image data collection folder containing metadata.csv (finding, view,
     modality, filename, patientid) and its images/ folder"""

_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}


def _normalise_split(value: str | None, *, where: str) -> str | None:
    if value is None:
        return None
    text = value.strip().lower()
    if not text:
        return None
    try:
        return _SPLIT_ALIASES[text]
    except KeyError:
        raise DataSourceError(
            f"{where}: unknown split {value!r}; use one of train, val (validation), test, "
            "or leave it empty to let the split be computed"
        ) from None


def _is_hidden(name: str) -> bool:
    return name.startswith((".", "__"))


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not _is_hidden(path.name)


def _images_under(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, hidden entries skipped), sorted."""
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not _is_hidden(d))
        found.extend(Path(root) / f for f in files if _is_image_file(Path(f)))
    return sorted(found)


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header (stripped) and rows of a CSV file, tolerant of a UTF-8 BOM."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = []
            for raw in reader:
                rows.append({(k or "").strip(): (v or "").strip() for k, v in raw.items() if k})
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataSourceError(f"cannot read CSV {path}: {exc}") from exc
    return header, rows


def _csv_header(path: Path) -> list[str]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            first = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    return [h.strip() for h in first]


def _lower_set(header: Iterable[str]) -> set[str]:
    return {h.lower() for h in header}


def _is_coronahack_header(header: Iterable[str]) -> bool:
    return {"x_ray_image_name", "label", "dataset_type"} <= _lower_set(header)


def _is_covid_collection_header(header: Iterable[str]) -> bool:
    return {"finding", "filename", "patientid"} <= _lower_set(header)


def _is_manifest_header(header: Iterable[str]) -> bool:
    return {"path", "label"} <= _lower_set(header)


def _drop_missing(samples: list[Sample], source: Path) -> list[Sample]:
    """Drop samples whose file does not exist, naming them in one warning."""
    kept = [s for s in samples if s.path.is_file()]
    missing = [s.path for s in samples if not s.path.is_file()]
    if missing:
        logger.warning(
            "%s: %d of %d listed images do not exist and are skipped: %s",
            source,
            len(missing),
            len(samples),
            name_some(missing),
        )
    return kept


# --------------------------------------------------------------------------------------------
# Importers
# --------------------------------------------------------------------------------------------


def _load_image_folder(root: Path) -> list[Sample]:
    children = sorted(p for p in root.iterdir() if p.is_dir() and not _is_hidden(p.name))
    split_dirs = [p for p in children if p.name.lower() in _SPLIT_ALIASES]
    samples: list[Sample] = []
    if split_dirs:
        ignored = [p.name for p in children if p not in split_dirs]
        if ignored:
            logger.warning("%s: split folders found; ignoring non-split folders %s", root, ignored)
        for split_dir in split_dirs:
            split = _SPLIT_ALIASES[split_dir.name.lower()]
            for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
                if _is_hidden(class_dir.name):
                    continue
                samples.extend(
                    Sample(path=f, label=class_dir.name, split=split)
                    for f in _images_under(class_dir)
                )
    else:
        for class_dir in children:
            samples.extend(Sample(path=f, label=class_dir.name) for f in _images_under(class_dir))
    return samples


def _load_manifest(csv_path: Path) -> list[Sample]:
    header, rows = _read_csv(csv_path)
    columns = {h.lower(): h for h in header}
    if not _is_manifest_header(header):
        raise DataSourceError(
            f"{csv_path}: a manifest needs columns path,label[,split][,patient_id]; "
            f"found {header}\n{ACCEPTED_SOURCES}"
        )
    path_col, label_col = columns["path"], columns["label"]
    split_col = columns.get("split")
    patient_col = columns.get("patient_id") or columns.get("patientid")
    base = csv_path.parent
    samples: list[Sample] = []
    unlabeled = 0
    for line, row in enumerate(rows, start=2):
        rel, label = row.get(path_col, ""), row.get(label_col, "")
        if not rel or not label:
            unlabeled += 1
            continue
        path = Path(rel).expanduser()
        if not path.is_absolute():
            path = base / path
        split = (
            _normalise_split(row.get(split_col), where=f"{csv_path}:{line}") if split_col else None
        )
        patient = (row.get(patient_col) or None) if patient_col else None
        samples.append(Sample(path=path, label=label, split=split, patient_id=patient))
    if unlabeled:
        logger.warning("%s: %d rows without path or label were skipped", csv_path, unlabeled)
    return _drop_missing(samples, csv_path)


def _index_files(root: Path, max_depth: int = 5) -> dict[str, list[Path]]:
    """Map lower-case file name -> paths under ``root`` (bounded depth, hidden skipped)."""
    index: dict[str, list[Path]] = defaultdict(list)
    root_depth = len(root.parts)
    for dirpath, dirs, files in os.walk(root):
        depth = len(Path(dirpath).parts) - root_depth
        dirs[:] = [] if depth >= max_depth else [d for d in dirs if not _is_hidden(d)]
        for name in files:
            if _is_image_file(Path(name)):
                index[name.lower()].append(Path(dirpath) / name)
    return index


def _coronahack_label(row: Mapping[str, str]) -> str | None:
    """Contract: Normal; COVID-19 (Label_2); Bacterial (Label_1 bacteria); Viral (Label_1 Virus)."""
    label = row.get("label", "").strip().lower()
    label1 = row.get("label_1_virus_category", "").strip().lower()
    label2 = row.get("label_2_virus_category", "").strip().lower()
    if label == "normal":
        return "Normal"
    if label2 == "covid-19":
        return "COVID-19"
    if label1 == "bacteria":
        return "Bacterial"
    if label1 == "virus":
        return "Viral"
    return None


def _load_coronahack(csv_path: Path) -> list[Sample]:
    """CoronaHack metadata; images are found by name under the CSV's folder.

    The Kaggle download nests them as
    ``Coronahack-Chest-XRay-Dataset/Coronahack-Chest-XRay-Dataset/{train,test}/``, but copies
    are often flattened, so we index file names under the CSV's folder and prefer the copy
    whose parent folder matches ``Dataset_type``.
    """
    _, raw_rows = _read_csv(csv_path)
    rows = [{k.lower(): v for k, v in r.items()} for r in raw_rows]
    index = _index_files(csv_path.parent)
    samples: list[Sample] = []
    unmapped: Counter[str] = Counter()
    not_found: list[str] = []
    for line, row in enumerate(rows, start=2):
        name = row.get("x_ray_image_name", "")
        if not name:
            continue
        label = _coronahack_label(row)
        if label is None:
            key = "/".join(
                v
                for v in (
                    row.get("label", ""),
                    row.get("label_1_virus_category", ""),
                    row.get("label_2_virus_category", ""),
                )
                if v
            )
            unmapped[key] += 1
            continue
        split = _normalise_split(row.get("dataset_type"), where=f"{csv_path}:{line}")
        candidates = index.get(name.lower(), [])
        if split is not None:
            preferred = [
                p for p in candidates if _SPLIT_ALIASES.get(p.parent.name.lower()) == split
            ]
            candidates = preferred or candidates
        if not candidates:
            not_found.append(name)
            continue
        samples.append(Sample(path=candidates[0], label=label, split=split))
    if unmapped:
        logger.info(
            "%s: %d rows outside the four classes were skipped: %s",
            csv_path,
            sum(unmapped.values()),
            dict(unmapped),
        )
    if not_found:
        logger.warning(
            "%s: %d images listed in the metadata were not found under %s and are skipped: %s",
            csv_path,
            len(not_found),
            csv_path.parent,
            name_some(not_found),
        )
    return samples


_FRONTAL_VIEWS = frozenset({"pa", "ap", "ap supine", "ap semi erect", "ap erect"})


def _covid_collection_label(finding: str) -> str | None:
    """Map a ``finding`` such as ``Pneumonia/Viral/COVID-19`` to one of the four classes."""
    text = finding.strip()
    if text.lower() == "no finding":
        return "Normal"
    parts = {p.strip().lower() for chunk in text.split("/") for p in chunk.split(",")}
    if "covid-19" in parts or "covid19" in parts:
        return "COVID-19"
    if "bacterial" in parts:
        return "Bacterial"
    if "viral" in parts:
        return "Viral"
    return None


def _load_covid_collection(csv_path: Path) -> list[Sample]:
    """Cohen et al.'s collection: frontal X-rays only; patient ids kept for grouped splits."""
    _, raw_rows = _read_csv(csv_path)
    rows = [{k.lower(): v for k, v in r.items()} for r in raw_rows]
    base = csv_path.parent
    samples: list[Sample] = []
    dropped: Counter[str] = Counter()
    unmapped: Counter[str] = Counter()
    for row in rows:
        filename = row.get("filename", "")
        if not filename:
            dropped["no filename"] += 1
            continue
        modality = row.get("modality", "").strip().lower().replace(" ", "")
        if modality and modality not in ("x-ray", "xray", "cr", "dx"):
            dropped[f"modality {row.get('modality')}"] += 1
            continue
        view = " ".join(row.get("view", "").lower().replace("_", " ").split())
        if view not in _FRONTAL_VIEWS:
            dropped[f"view {row.get('view') or '(none)'}"] += 1
            continue
        label = _covid_collection_label(row.get("finding", ""))
        if label is None:
            unmapped[row.get("finding") or "(none)"] += 1
            continue
        folder = row.get("folder") or "images"
        samples.append(
            Sample(
                path=base / folder / filename,
                label=label,
                split=None,
                patient_id=row.get("patientid") or None,
            )
        )
    if dropped:
        logger.info("%s: dropped non-frontal or non-X-ray rows: %s", csv_path, dict(dropped))
    if unmapped:
        logger.info(
            "%s: %d rows with findings outside the four classes were skipped: %s",
            csv_path,
            sum(unmapped.values()),
            dict(unmapped),
        )
    return _drop_missing(samples, csv_path)


def _load_csv(csv_path: Path) -> list[Sample]:
    header = _csv_header(csv_path)
    if _is_coronahack_header(header):
        return _load_coronahack(csv_path)
    if _is_covid_collection_header(header):
        return _load_covid_collection(csv_path)
    if _is_manifest_header(header):
        return _load_manifest(csv_path)
    raise DataSourceError(f"{csv_path}: unrecognised CSV columns {header}\n{ACCEPTED_SOURCES}")


def _find_coronahack_csv(root: Path, max_depth: int = 2) -> Path | None:
    direct = root / CORONAHACK_CSV
    if direct.is_file():
        return direct
    for dirpath, dirs, files in os.walk(root):
        depth = len(Path(dirpath).parts) - len(root.parts)
        if CORONAHACK_CSV in files:
            return Path(dirpath) / CORONAHACK_CSV
        dirs[:] = [] if depth >= max_depth else sorted(d for d in dirs if not _is_hidden(d))
    return None


def _detect_directory(root: Path) -> tuple[str, Path]:
    """Which importer handles ``root``: returns (kind, path to hand to it)."""
    coronahack = _find_coronahack_csv(root)
    if coronahack is not None:
        return "coronahack", coronahack
    metadata = root / COVID_COLLECTION_CSV
    if metadata.is_file() and _is_covid_collection_header(_csv_header(metadata)):
        return "covid-collection", metadata
    # An explicit manifest beats guessing from folder names (cxr4 ships both; they agree).
    manifests = [
        p
        for p in sorted(root.glob("*.csv"))
        if not _is_hidden(p.name) and _is_manifest_header(_csv_header(p))
    ]
    preferred = [p for p in manifests if p.name.lower() == "manifest.csv"]
    if preferred or len(manifests) == 1:
        return "manifest", (preferred or manifests)[0]
    if len(manifests) > 1:
        raise DataSourceError(
            f"{root}: several CSV manifests ({[p.name for p in manifests]}); pass the one to "
            "use as the source"
        )
    if any(p.is_dir() and not _is_hidden(p.name) and _images_under(p) for p in root.iterdir()):
        return "image-folder", root
    raise DataSourceError(
        f"{root}: no images or metadata found in a known layout\n{ACCEPTED_SOURCES}"
    )


def source_name(src: Path | str) -> str:
    """The default name of a source: its folder's name (a CSV file names its folder, and a
    split folder such as ``cxr4/train`` names the collection above it)."""
    path = Path(src).expanduser().resolve()
    if path.suffix.lower() == ".csv":
        path = path.parent
    if path.name.lower() in _SPLIT_ALIASES and path.parent.name:
        path = path.parent
    return path.name or str(path)


def load_source(src: Path | str, *, name: str | None = None) -> list[Sample]:
    """Load every labelled image of ``src`` (any of the four accepted sources).

    ``src`` may be the folder or the CSV file itself. Files that are listed but missing are
    dropped with one warning; splits are those the source gives (``None`` otherwise). Every
    sample's ``source`` is ``name`` (default :func:`source_name`).

    Raises:
        FileNotFoundError: ``src`` does not exist.
        DataSourceError: the layout is not recognised (the message lists accepted layouts),
            or the source holds no images.
    """
    path = Path(src).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data source {path} does not exist\n{ACCEPTED_SOURCES}")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DataSourceError(f"{path}: not a folder or a CSV file\n{ACCEPTED_SOURCES}")
        kind, target = "csv", path
        samples = _load_csv(path)
    else:
        kind, target = _detect_directory(path)
        loaders: dict[str, Callable[[Path], list[Sample]]] = {
            "coronahack": _load_coronahack,
            "covid-collection": _load_covid_collection,
            "manifest": _load_manifest,
            "image-folder": _load_image_folder,
        }
        samples = loaders[kind](target)
    if not samples:
        raise DataSourceError(f"{target}: the source holds no usable labelled images")
    name = name or source_name(path)
    samples = [dataclasses.replace(s, source=name) for s in samples]
    logger.info(
        "loaded %d images from %s (%s, source %r): %s",
        len(samples),
        target,
        kind,
        name,
        class_counts(samples),
    )
    return samples


def load_sources(srcs: Sequence[Path | str]) -> list[Sample]:
    """Load several sources into one list; each sample keeps the name of its source.

    Two sources with the same folder name (``a/data`` and ``b/data``) get distinct names
    (``data``, ``data-2``), because merging them would hide a site difference from the
    sampler and the per-source metrics.
    """
    if not srcs:
        raise DataSourceError(f"no data source given\n{ACCEPTED_SOURCES}")
    out: list[Sample] = []
    taken: Counter[str] = Counter()
    for src in srcs:
        base = source_name(src)
        taken[base] += 1
        name = base if taken[base] == 1 else f"{base}-{taken[base]}"
        out.extend(load_source(src, name=name))
    return out
