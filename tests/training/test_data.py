"""Importers, splits, the data set and the balanced sampler, on fixtures written in tmp_path."""

from __future__ import annotations

import csv
import io
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import (
    DataSourceError,
    Sample,
    XrayDataset,
    balanced_sampler,
    class_counts,
    class_names,
    group_ids,
    load_source,
    load_sources,
    split_samples,
    summarise,
)
from training.preprocess import Preprocessing

SPEC = Preprocessing(image_size=16)


def write_image(path: Path, value: int = 128, fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((12, 10), value, np.uint8)
    arr[0, 0] = 255 - value
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    path.write_bytes(buf.getvalue())
    return path


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# ------------------------------------------------------------------------------------------
# Image folders and manifests
# ------------------------------------------------------------------------------------------


def test_image_folder_without_splits(tmp_path: Path) -> None:
    for label, n in (("Normal", 3), ("COVID-19", 2)):
        for i in range(n):
            write_image(tmp_path / label / f"{i}.png")
    write_image(tmp_path / "Normal" / "x.jpg", fmt="JPEG")
    (tmp_path / "Normal" / "notes.txt").write_text("ignored")
    (tmp_path / ".hidden").mkdir()
    samples = load_source(tmp_path)
    assert class_counts(samples) == {"COVID-19": 2, "Normal": 4}
    assert all(s.split is None and s.patient_id is None for s in samples)
    assert class_names(samples) == ["COVID-19", "Normal"]


def test_image_folder_with_splits_and_validation_alias(tmp_path: Path) -> None:
    for split in ("train", "validation", "test"):
        for label in ("A", "B"):
            write_image(tmp_path / split / label / "img.png")
    samples = load_source(str(tmp_path))
    assert Counter(s.split for s in samples) == {"train": 2, "val": 2, "test": 2}
    splits = split_samples(samples)
    assert {k: len(v) for k, v in splits.items()} == {"train": 2, "val": 2, "test": 2}


def test_csv_manifest_relative_paths_patient_and_split(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_image(root / "imgs" / "a.png")
    write_image(root / "imgs" / "b.png")
    write_image(root / "imgs" / "c.png")
    manifest = write_csv(
        root / "list.csv",
        ["path", "label", "split", "patient_id"],
        [
            ["imgs/a.png", "Normal", "train", "p1"],
            ["imgs/b.png", "Viral", "Validation", "p2"],
            ["imgs/c.png", "Viral", "test", ""],
            ["imgs/missing.png", "Viral", "test", "p3"],
        ],
    )
    for src in (manifest, root):  # the CSV itself, or the folder holding it
        samples = load_source(src)
        assert [s.path.name for s in samples] == ["a.png", "b.png", "c.png"]
        assert [s.split for s in samples] == ["train", "val", "test"]
        assert [s.patient_id for s in samples] == ["p1", "p2", None]
        assert samples[0].path == root / "imgs" / "a.png"


def test_manifest_with_bad_split_names_the_row(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    manifest = write_csv(tmp_path / "m.csv", ["path", "label", "split"], [["a.png", "X", "hold"]])
    with pytest.raises(DataSourceError, match=r"m\.csv:2.*unknown split"):
        load_source(manifest)


def test_unknown_layout_lists_the_accepted_ones(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(DataSourceError, match="accepted data sources") as info:
        load_source(tmp_path)
    assert "CoronaHack" in str(info.value) and "manifest" in str(info.value)
    odd = write_csv(tmp_path / "odd.csv", ["a", "b"], [[1, 2]])
    with pytest.raises(DataSourceError, match="accepted data sources"):
        load_source(odd)
    with pytest.raises(FileNotFoundError):
        load_source(tmp_path / "nope")


# ------------------------------------------------------------------------------------------
# CoronaHack and the COVID-19 image data collection
# ------------------------------------------------------------------------------------------


def test_coronahack_metadata_and_nested_folders(tmp_path: Path, caplog) -> None:
    nested = tmp_path / "Coronahack-Chest-XRay-Dataset" / "Coronahack-Chest-XRay-Dataset"
    rows = [
        [0, "n1.jpeg", "Normal", "TRAIN", "", ""],
        [1, "b1.jpeg", "Pnemonia", "TRAIN", "", "bacteria"],
        [2, "v1.jpeg", "Pnemonia", "TEST", "", "Virus"],
        [3, "c1.jpeg", "Pnemonia", "TRAIN", "COVID-19", "Virus"],
        [4, "s1.jpeg", "Pnemonia", "TRAIN", "", "Stress-Smoking"],
        [5, "gone.jpeg", "Normal", "TEST", "", ""],
    ]
    for _, name, _, split, _, _ in rows[:5]:
        write_image(nested / split.lower() / name, fmt="JPEG")
    write_image(nested / "train" / "v1.jpeg", fmt="JPEG")  # same name in the other split
    write_csv(
        tmp_path / "Chest_xray_Corona_Metadata.csv",
        [
            "",
            "X_ray_image_name",
            "Label",
            "Dataset_type",
            "Label_2_Virus_category",
            "Label_1_Virus_category",
        ],
        rows,
    )
    with caplog.at_level(logging.INFO, logger="training.data"):
        samples = load_source(tmp_path)
    by_name = {s.path.name: s for s in samples}
    assert {n: (s.label, s.split) for n, s in by_name.items()} == {
        "n1.jpeg": ("Normal", "train"),
        "b1.jpeg": ("Bacterial", "train"),
        "v1.jpeg": ("Viral", "test"),
        "c1.jpeg": ("COVID-19", "train"),
    }
    assert by_name["v1.jpeg"].path.parent.name == "test"  # the copy matching Dataset_type
    assert "gone.jpeg" in caplog.text and "Stress-Smoking" in caplog.text
    splits = split_samples(samples)  # train/test given: val carved from train
    assert len(splits["test"]) == 1 and len(splits["train"]) + len(splits["val"]) == 3


def covid_collection(tmp_path: Path) -> Path:
    rows = []
    findings = {
        "Pneumonia/Viral/COVID-19": 8,
        "No Finding": 6,
        "Pneumonia/Bacterial/Streptococcus": 4,
        "Pneumonia/Viral/SARS": 4,
    }
    n = 0
    for finding, patients in findings.items():
        for p in range(patients):
            for view in ("PA", "AP Supine"):  # two frontal images per patient
                name = f"img{n}.png"
                write_image(tmp_path / "images" / name, value=n % 250)
                rows.append([f"{finding[:4]}{p}", finding, view, "X-ray", "images", name])
                n += 1
    rows.append(["lat1", "Pneumonia/Viral/COVID-19", "L", "X-ray", "images", "lateral.png"])
    rows.append(["ct1", "Pneumonia/Viral/COVID-19", "Axial", "CT", "volumes", "ct.nii.gz"])
    rows.append(["tb1", "Tuberculosis", "PA", "X-ray", "images", "tb.png"])
    write_image(tmp_path / "images" / "lateral.png")
    write_image(tmp_path / "images" / "tb.png")
    return write_csv(
        tmp_path / "metadata.csv",
        ["patientid", "finding", "view", "modality", "folder", "filename"],
        rows,
    )


def test_covid_collection_keeps_frontal_xrays_and_maps_findings(tmp_path: Path) -> None:
    metadata = covid_collection(tmp_path)
    samples = load_source(metadata)
    assert load_source(tmp_path) == samples
    names = {s.path.name for s in samples}
    assert "lateral.png" not in names and "ct.nii.gz" not in names and "tb.png" not in names
    assert class_counts(samples) == {"Bacterial": 8, "COVID-19": 16, "Normal": 12, "Viral": 8}
    assert all(s.patient_id and s.split is None for s in samples)


def test_patient_grouped_split_never_straddles_and_is_deterministic(tmp_path: Path) -> None:
    samples = load_source(covid_collection(tmp_path))
    splits = split_samples(samples, val_fraction=0.2, test_fraction=0.2, seed=3)
    patients = {name: {s.patient_id for s in items} for name, items in splits.items()}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    assert sum(len(v) for v in splits.values()) == len(samples)
    for name in ("val", "test"):  # stratified: every class reaches every split here
        assert set(class_counts(splits[name])) == {"Bacterial", "COVID-19", "Normal", "Viral"}
    assert all(s.split == name for name, items in splits.items() for s in items)
    assert split_samples(samples, val_fraction=0.2, test_fraction=0.2, seed=3) == splits
    other = split_samples(samples, val_fraction=0.2, test_fraction=0.2, seed=4)
    assert other != splits


def test_split_without_patients_is_stratified_and_sized() -> None:
    samples = [Sample(Path(f"{c}{i}.png"), c) for c in "ABC" for i in range(40)]
    samples += [Sample(Path(f"D{i}.png"), "D") for i in range(7)]
    splits = split_samples(samples, val_fraction=0.15, test_fraction=0.15, seed=0)
    assert summarise(splits)["train"]["A"] == 28
    assert summarise(splits)["test"]["A"] == 6
    assert 1 <= class_counts(splits["test"])["D"] <= 2
    with pytest.raises(DataSourceError, match="no split"):
        split_samples([Sample(Path("a"), "A", "train"), Sample(Path("b"), "A", None)])
    with pytest.raises(ValueError):
        split_samples(samples, val_fraction=0.6, test_fraction=0.5)


# ------------------------------------------------------------------------------------------
# Dataset and sampler
# ------------------------------------------------------------------------------------------


def test_dataset_skips_corrupt_files_with_one_warning(tmp_path: Path, caplog) -> None:
    good = [write_image(tmp_path / f"ok{i}.png", value=40 * i) for i in range(4)]
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good[0].read_bytes()[:40])
    text = tmp_path / "text.png"
    text.write_text("not an image")
    labels = ["A", "B", "A", "B", "A", "B"]
    samples = [Sample(p, lab) for p, lab in zip([*good, truncated, text], labels, strict=True)]
    with caplog.at_level(logging.WARNING, logger="training.data"):
        dataset = XrayDataset(samples, ["A", "B"], SPEC, augment=False)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "2 of 6" in warnings[0].getMessage()
    assert "truncated.png" in warnings[0].getMessage() and "text.png" in warnings[0].getMessage()
    assert dataset.skipped == [truncated, text]
    assert len(dataset) == 4
    np.testing.assert_array_equal(dataset.labels, [0, 1, 0, 1])
    x, y = dataset[1]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and y == 1
    torch.testing.assert_close(dataset[1][0], x)  # cached, not augmented: stable


def test_dataset_augments_on_the_fly_and_works_without_cache(tmp_path: Path) -> None:
    paths = [write_image(tmp_path / f"{i}.png", value=30 * i) for i in range(3)]
    samples = [Sample(p, "A") for p in paths]
    torch.manual_seed(0)
    augmented = XrayDataset(samples, ["A", "B"], SPEC, augment=True)
    plain = XrayDataset(samples, ["A", "B"], SPEC, augment=False, cache=False)
    assert augmented[0][0].shape == plain[0][0].shape == (1, 16, 16)
    assert not torch.equal(augmented[2][0], plain[2][0])
    with pytest.raises(ValueError, match="not among the classes"):
        XrayDataset(samples, ["B"], SPEC, augment=False)


def test_balanced_sampler_batches_contain_every_class() -> None:
    labels = np.array([0] * 200 + [1] * 100 + [2] * 60 + [3] * 5)
    np.random.seed(0)
    sampler = balanced_sampler(labels, m_per_class=4)
    assert sampler.batch_size == 16
    indices = list(iter(sampler))
    assert len(indices) == len(sampler) and len(indices) % 16 == 0
    for start in range(0, len(indices), 16):
        batch = labels[indices[start : start + 16]]
        assert Counter(batch.tolist()) == {0: 4, 1: 4, 2: 4, 3: 4}
    with pytest.raises(ValueError):
        balanced_sampler(labels, m_per_class=4, batch_size=18)


def test_label_x_source_batches_balance_sources_within_each_class() -> None:
    # A children's hospital with many Normal/Bacterial, an adult one with few Normal/Pneumonia.
    samples = (
        [Sample(Path(f"k{i}"), "Normal", source="kids") for i in range(300)]
        + [Sample(Path(f"b{i}"), "Bacterial", source="kids") for i in range(200)]
        + [Sample(Path(f"a{i}"), "Normal", source="adult") for i in range(20)]
        + [Sample(Path(f"p{i}"), "Pneumonia", source="adult") for i in range(9)]
    )
    groups = group_ids(samples)
    assert len(set(groups.tolist())) == 4
    np.random.seed(1)
    sampler = balanced_sampler(groups, m_per_class=5)
    indices = list(iter(sampler))
    assert len(indices) >= 100
    for start in range(0, len(indices), sampler.batch_size):
        batch = Counter((samples[i].label, samples[i].source) for i in indices[start : start + 20])
        # Normal comes from both hospitals equally; no source dominates the batch.
        assert batch == {
            ("Normal", "kids"): 5, ("Bacterial", "kids"): 5,
            ("Normal", "adult"): 5, ("Pneumonia", "adult"): 5,
        }  # fmt: skip


def test_several_sources_keep_their_names_and_are_split_each(tmp_path: Path) -> None:
    for site, labels in (("site_a", ["Normal", "COVID-19"]), ("site_b", ["Normal", "Other"])):
        for label in labels:
            for i in range(10):
                write_image(tmp_path / site / "data" / label / f"{i}.png", value=10 * i)
    samples = load_sources([tmp_path / "site_a" / "data", tmp_path / "site_b" / "data"])
    assert {s.source for s in samples} == {"data", "data-2"}  # same folder name, kept apart
    splits = split_samples(samples, val_fraction=0.2, test_fraction=0.2, seed=0)
    for name in ("train", "val", "test"):
        assert {s.source for s in splits[name]} == {"data", "data-2"}
        assert {s.label for s in splits[name] if s.source == "data-2"} == {"Normal", "Other"}
    assert sum(len(v) for v in splits.values()) == 40
    with pytest.raises(DataSourceError):
        load_sources([])


# ------------------------------------------------------------------------------------------
# The real cxr4 set (skipped on a fresh checkout)
# ------------------------------------------------------------------------------------------


def test_cxr4_counts(cxr4: Path) -> None:
    splits = split_samples(load_source(cxr4))
    summary = summarise(splits)
    assert summary["train"] == {
        "Bacterial": 674,
        "COVID-19": 49,
        "Normal": 923,
        "Viral": 429,
        "total": 2075,
    }
    assert summary["val"]["total"] == 444 and summary["test"]["total"] == 444
    assert all(s.path.is_file() for s in splits["test"][:5])
