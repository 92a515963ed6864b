"""serve.answer_detail: each level's body (hand-written key sets and values), a query attack
answered without label or scores at every level, and the OpenAPI schema naming every body."""

from __future__ import annotations

import numpy as np
import pytest

from twostream.core.config import ThresholdsConfig, load_config
from twostream.core.labels import Refusal
from twostream.core.reputation import Outcome
from twostream.core.results import score_rows
from twostream.online.api import (BlockedResponse, ClassifyResponse, LabelResponse, QueryAttackResponse,
                                  VerdictResponse, build_classify_response)

STAMP = {"image_id", "source", "timestamp", "seq", "standing"}
KEYS = {
    "full": STAMP | {"response", "verdict", "label", "imagenet_index", "imagenet_name", "agreement", "high_topk",
                     "low_topk", "width", "height", "timings_ms"},
    "label": STAMP | {"response"},
    "verdict": STAMP | {"verdict"},
    "query_attack": STAMP | {"response", "detail"},
    "blocked": STAMP | {"error", "detail", "response"},
}


@pytest.fixture(scope="module")
def batch():
    """Row 0: ImageNet 281 (tabby) at 0.6 and CIFAR cat (3) at 0.7: accepted as cat (agreement
    0.42). Row 1: ImageNet 404 (airliner) at 0.9 and CIFAR cat at 0.8: no agreeing pair, rejected."""
    high_idx = np.array([[281, 282, 283, 284, 285], [404, 281, 1, 2, 3]])
    high_prob = np.array([[0.6, 0.1, 0.1, 0.1, 0.1], [0.9, 0.02, 0.02, 0.02, 0.02]])
    low_idx, low_prob = np.array([[3, 5], [3, 5]]), np.array([[0.7, 0.3], [0.8, 0.2]])
    return score_rows(["a", "b"], [None, None], [(40, 60), (40, 60)], high_idx, high_prob, low_idx, low_prob,
                      ThresholdsConfig(p1=0.1, p2=0.2))


def answer(batch, row: int, response: str, detail: str, cc: int = 0, blacklisted: bool = False) -> dict:
    body = build_classify_response(batch, row, source="s", timestamp=1.5, outcome=Outcome(response, cc, blacklisted),
                                   timings_ms={"total": 1.0}, seq=4, detail=detail)
    return body.model_dump(mode="json")


def test_the_default_level_faces_untrusted_clients():
    assert load_config().serve.answer_detail == "label"


def test_each_level_of_an_accepted_image(batch):
    stamp = {"image_id": "a", "source": "s", "timestamp": 1.5, "seq": 4, "standing": {"cc": 0, "blacklisted": False}}
    full = answer(batch, 0, "cat", "full")
    assert set(full) == KEYS["full"]
    assert (full["response"], full["verdict"], full["label"], full["imagenet_index"]) == ("cat", "accepted", "cat", 281)
    assert full["agreement"] == pytest.approx(0.42) and [e["index"] for e in full["low_topk"]] == [3, 5]
    assert answer(batch, 0, "cat", "label") == {**stamp, "response": "cat"}
    assert answer(batch, 0, "cat", "verdict") == {**stamp, "verdict": "accepted"}


def test_each_level_of_a_rejected_image(batch):
    stamp = {"image_id": "b", "source": "s", "timestamp": 1.5, "seq": 4, "standing": {"cc": 1, "blacklisted": False}}
    full = answer(batch, 1, Refusal.ADVERSARIAL, "full", cc=1)
    assert set(full) == KEYS["full"] and (full["verdict"], full["label"]) == ("adversarial", None)
    assert answer(batch, 1, Refusal.ADVERSARIAL, "label", cc=1) == {**stamp, "response": "adversarial"}
    assert answer(batch, 1, Refusal.ADVERSARIAL, "verdict", cc=1) == {**stamp, "verdict": "rejected"}


@pytest.mark.parametrize("row", [0, 1])  # whatever Algorithm 1 said, the detection hides it
def test_a_query_attack_gives_no_label_and_no_scores(batch, row):
    for detail in ("full", "label"):
        body = answer(batch, row, Refusal.QUERY_ATTACK, detail, cc=1)
        assert set(body) == KEYS["query_attack"] and body["response"] == "query_attack"
        assert "near-identical" in body["detail"]
    assert answer(batch, row, Refusal.QUERY_ATTACK, "verdict", cc=1)["verdict"] == "rejected"


@pytest.mark.parametrize("detail", ["full", "label", "verdict"])
def test_blocked_is_the_same_at_every_level(batch, detail):
    body = answer(batch, 0, Refusal.BLOCKED, detail, cc=3, blacklisted=True)
    assert set(body) == KEYS["blocked"] and body["response"] == "blocked"


def test_the_openapi_schema_names_every_body():
    from jobs.serve import api

    schema = api.openapi()
    components = schema["components"]["schemas"]
    for model, keys in ((ClassifyResponse, KEYS["full"]), (LabelResponse, KEYS["label"]),
                        (VerdictResponse, KEYS["verdict"]), (QueryAttackResponse, KEYS["query_attack"]),
                        (BlockedResponse, KEYS["blocked"])):
        assert set(components[model.__name__]["properties"]) == keys, model.__name__
    ok = schema["paths"]["/v1/classify"]["post"]["responses"]["200"]
    refs = {r["$ref"].rsplit("/", 1)[1] for r in ok["content"]["application/json"]["schema"]["anyOf"]}
    assert refs == {"ClassifyResponse", "LabelResponse", "VerdictResponse", "QueryAttackResponse"}
    assert components["QueryAttackResponse"]["properties"]["response"]["const"] == "query_attack"
    assert components["VerdictResponse"]["properties"]["verdict"]["enum"] == ["accepted", "rejected"]
