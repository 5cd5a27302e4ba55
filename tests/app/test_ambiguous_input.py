"""Ambiguous or contradictory input is refused with a message saying what to do, never
answered for one arbitrary reading: repeated multipart fields, an image re-enrolled under
another label, labels that only differ by case, width or look-alike letters."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.services.references import label_skeleton, normalize_label
from tests.app.conftest import png_bytes
from tests.app.conftest_predict import synthetic_xray

H = dict[str, dict[str, str]]
CYRILLIC_O = "\u043e"


def enroll(client: TestClient, headers: dict[str, str], label: str, *seeds: int):
    files = [("file", (f"{s}.png", png_bytes(s), "image/png")) for s in seeds]
    return client.post("/references", headers=headers, data={"label": label}, files=files)


def classes(client: TestClient, headers: H) -> list[dict]:
    return client.get("/classes", headers=headers["reader"]).json()


def test_labels_are_nfkc_and_whitespace_normalised(client: TestClient, headers: H) -> None:
    # full-width letters, a non-breaking space and a run of spaces and tabs
    response = enroll(client, headers["clinician"], "\uff23OVID\u00a0 \t-19 \n", 1)
    assert response.status_code == 201, response.text
    assert response.json()["references"][0]["label"] == "COVID -19"
    again = enroll(client, headers["clinician"], "COVID  -19", 2)
    assert again.status_code == 201, again.text
    assert classes(client, headers) == [{"label": "COVID -19", "count": 2}]


@pytest.mark.parametrize(
    "variant", ["normal", "NORMAL", "Normal ", f"N{CYRILLIC_O}rmal", "N\u041eRMAL"]
)
def test_case_and_lookalike_variants_of_a_class_are_refused(
    client: TestClient, headers: H, variant: str
) -> None:
    assert enroll(client, headers["clinician"], "Normal", 3).status_code == 201
    response = enroll(client, headers["clinician"], variant, 4)
    if variant.strip() == "Normal":  # only whitespace differs: the same class after trimming
        assert response.status_code == 201, response.text
        assert response.json()["references"][0]["label"] == "Normal"
        return
    assert response.status_code == 409, response.text
    detail = response.json()["detail"]
    assert "'Normal'" in detail and "enroll under" in detail
    assert classes(client, headers) == [{"label": "Normal", "count": 1}]


def test_skeleton_maps_lookalikes_but_keeps_distinct_classes_apart() -> None:
    assert label_skeleton(f"N{CYRILLIC_O}rmal") == label_skeleton("normal") == "normal"
    assert label_skeleton("Pneumonia\u2013viral") == label_skeleton("pneumonia-viral")
    assert label_skeleton("Viral") != label_skeleton("Bacterial")
    assert label_skeleton("COVID-19") != label_skeleton("COVID-18")
    assert normalize_label(" a\u2003 b ") == "a b"


def test_reenroll_under_another_label_is_409_and_keeps_the_first(
    client: TestClient, headers: H
) -> None:
    first = enroll(client, headers["clinician"], "Viral", 5).json()["references"][0]
    response = enroll(client, headers["clinician"], "Bacterial", 6, 5)
    assert response.status_code == 409, response.text
    detail = response.json()["detail"]
    assert first["id"] in detail and "'Viral'" in detail and "DELETE /references/" in detail
    # all or nothing: the other image of the request was not enrolled either
    assert classes(client, headers) == [{"label": "Viral", "count": 1}]
    same = enroll(client, headers["clinician"], "Viral", 5)
    assert same.status_code == 201 and same.json()["references"][0]["duplicate"] is True


def test_two_label_fields_are_refused(client: TestClient, headers: H) -> None:
    response = client.post(
        "/references",
        headers=headers["clinician"],
        data={"label": ["Viral", "Bacterial"]},
        files={"file": ("a.png", png_bytes(7), "image/png")},
    )
    assert response.status_code == 422, response.text
    assert "2 'label' fields" in response.json()["detail"]
    assert classes(client, headers) == []


def test_label_filter_is_normalised_like_enrollment(client: TestClient, headers: H) -> None:
    enroll(client, headers["clinician"], "Normal", 8, 9)
    enroll(client, headers["clinician"], "Viral", 10)
    for query in ("Normal", " normal ", "NORMAL", f"N{CYRILLIC_O}rmal", "\uff2eormal"):
        listed = client.get("/references", headers=headers["reader"], params={"label": query})
        assert listed.status_code == 200
        body = listed.json()
        assert body["count"] == 2 and {r["label"] for r in body["data"]} == {"Normal"}, query
    unknown = client.get("/references", headers=headers["reader"], params={"label": "Fungal"})
    assert unknown.json()["count"] == 0


def test_two_files_to_predict_are_refused(
    client: TestClient, headers: H, model_version: str
) -> None:
    for kind in ("disc", "stripes"):
        files = [("file", (f"{i}.png", synthetic_xray(kind, seed=i), "image/png")) for i in (1, 2)]
        assert (
            client.post(
                "/references", headers=headers["clinician"], data={"label": kind}, files=files
            ).status_code
            == 201
        )
    files = [
        ("file", ("a.png", synthetic_xray("disc", seed=50), "image/png")),
        ("file", ("b.png", synthetic_xray("stripes", seed=51), "image/png")),
    ]
    response = client.post(
        "/predict", headers=headers["reader"], params={"explain": "false"}, files=files
    )
    assert response.status_code == 422, response.text
    assert "2 'file' fields" in response.json()["detail"]
    one = client.post(
        "/predict", headers=headers["reader"], params={"explain": "false"}, files=files[:1]
    )
    assert one.status_code == 200, one.text
