import torch
torch.__version__ = str(torch.__version__)
from tests.app.conftest_predict import post_predict, synthetic_xray, CLASS_KINDS

def test_smoke(client, headers, enrolled):
    for kind in CLASS_KINDS:
        for s in range(3):
            r = post_predict(client, headers["reader"], synthetic_xray(kind, seed=900+s), explain=(s==0))
            assert r.status_code == 200, r.text
            j = r.json()
            print(kind, j["label"], j["confidence"], j["unknown"], j["distances"], j["outlier_score"], j["outlier_threshold"], (j["gradcam"] or {}).get("label"))
    for s in range(3):
        r = post_predict(client, headers["reader"], synthetic_xray("noise", seed=s), explain=False)
        j = r.json(); print("noise", j["label"], j["unknown"], j["distances"], j["outlier_score"], j["outlier_threshold"])
