"""dens-serve's drift check: the reference the model card gives (its dense calls on the test split's exams),
the range a window of n exams is expected to stay within, the verdicts of the rolling windows per manufacturer
and model (driven with calls directly), and end to end: windows read back from the state at a restart, a unit
outside its range warned of in the log, the audit log, /metrics and the full /status."""

from __future__ import annotations

import json
import secrets

import numpy as np
import pytest

from dens.serve.drift import (
    MAX_UNITS,
    NO_REFERENCE,
    OTHER,
    OUTSIDE,
    TOO_FEW,
    UNKNOWN,
    WITHIN,
    Drift,
    Reference,
    unit_of,
)
from dens.serve.state import State, key
from test_model_signature import edited
from test_serve import Node, make_study, wait_for
from test_serve_metrics import get, samples, send, value

TOKEN_ENV = "DENS_TEST_DRIFT_TOKEN"
# A test split of 400 exams, 160 of them dense, called with sensitivity 0.8 and specificity 0.9: the model
# called 0.8 * 160 + 0.1 * 240 = 152 of them dense (0.38).
CARD = {
    "format": 1,
    "test": {"exam": {"n": 400, "dense": {"n": 400, "positives": 160, "sensitivity": 0.8, "specificity": 0.9}}},
    "data": {"splits": {"test": {"images": 1600, "classes": {"A": 200, "B": 760, "C": 520, "D": 120}}}},
}


def metadata(card: dict | None = CARD) -> dict:
    return {"summary": {} if card is None else {"model_card": card}}


def reference() -> Reference:
    found, why = Reference.of(metadata())
    assert found is not None, why
    return found


def test_the_reference_is_the_models_dense_calls_on_its_test_exams():
    ref = reference()
    assert (ref.dense, ref.exams, ref.share) == (152, 400, 0.38)
    assert dict(ref.images_by_class) == {"A": 200, "B": 760, "C": 520, "D": 120}
    no_card, why = Reference.of(metadata(None))
    assert no_card is None and "no model card" in why
    no_exams, why = Reference.of(metadata({"format": 1, "test": {"image": {}}}))
    assert no_exams is None and "exam-level test figures" in why
    lacking = json.loads(json.dumps(CARD))
    lacking["test"]["exam"]["dense"]["specificity"] = None
    assert Reference.of(metadata(lacking))[0] is None
    all_dense = json.loads(json.dumps(CARD))
    all_dense["test"]["exam"]["dense"].update(positives=400, specificity=None)  # no negatives: none needed
    assert Reference.of(metadata(all_dense))[0].share == 0.8


def test_the_expected_range_narrows_with_the_window_and_holds_99_in_100():
    ref = reference()
    ranges = [ref.expected(n) for n in (50, 200, 500, 5000)]
    widths = [high - low for low, high in ranges]
    assert all(low < 0.38 < high for low, high in ranges) and widths == sorted(widths, reverse=True)
    assert widths[-1] > 2 * 2.576 * (0.38 * 0.62 / 400) ** 0.5 * 0.9  # the test split's own 400 exams still count
    rng = np.random.default_rng(0)
    low, high = ref.expected(200)
    alike = rng.binomial(200, 0.38, 20000) / 200  # windows of exams like the test split's
    assert np.mean((alike < low) | (alike > high)) < 0.01
    shifted = rng.binomial(200, 0.55, 20000) / 200  # a unit whose calls went denser
    assert np.mean((shifted < low) | (shifted > high)) > 0.9
    zero = Reference(0, 100, {})  # a test split the model called none of dense still gives a range
    assert zero.expected(100)[1] > 0


def calls(n: int, dense_share: float) -> list[str]:
    """``n`` calls, dense ones spread evenly among them at ``dense_share``."""
    return ["C" if int((i + 1) * dense_share) > int(i * dense_share) else "B" for i in range(n)]


def test_a_window_outside_the_range_warns_once_and_one_inside_does_not():
    drift = Drift(100, reference(), min_exams=50)
    acme, other = ("ACME", "Mammo 1"), ("OTHERCO", "X")
    changes = [drift.add(f"a{i}", acme, c) for i, c in enumerate(calls(49, 0.38))]
    assert changes == [None] * 49 and drift.unit(acme)["verdict"] == TOO_FEW
    changes = [drift.add(f"o{i}", other, c) for i, c in enumerate(calls(100, 0.40))]
    assert changes == [None] * 100 and drift.unit(other)["verdict"] == WITHIN
    changes = [drift.add(f"b{i}", acme, "D") for i in range(60)]  # 49 + 60 > 100: the window rolls
    warned = [c for c in changes if c is not None]
    assert len(warned) == 1 and warned[0].warning and warned[0].unit == acme and warned[0].exams >= 50
    assert warned[0].dense_share > warned[0].expected[1] and "drift warning: ACME Mammo 1" in warned[0].line()
    shown = drift.unit(acme)
    assert shown["exams"] == 100 and shown["verdict"] == OUTSIDE and shown["shares"]["D"] == 0.6
    assert shown["dense_share"] == pytest.approx(0.6 + 40 / 100 * 0.38, abs=0.01)
    assert drift.unit(other)["verdict"] == WITHIN  # each unit its own window
    back = [c for c in (drift.add(f"c{i}", acme, d) for i, d in enumerate(calls(100, 0.38))) if c is not None]
    assert [c.warning for c in back] == [False] and "back within" in back[0].line()
    assert drift.snapshot()["units"][0]["manufacturer"] == "ACME"


def test_without_a_reference_there_is_never_a_warning():
    drift = Drift(100, *Reference.of(metadata(None)), min_exams=50)
    assert [drift.add(f"s{i}", ("ACME", "M"), "D") for i in range(200)] == [None] * 200
    shown = drift.snapshot()
    assert shown["reference"] is None and "no model card" in shown["no_reference"]
    assert shown["units"][0]["verdict"] == NO_REFERENCE and shown["units"][0]["dense_share"] == 1.0


def test_a_study_answered_again_replaces_its_call_and_units_are_bounded():
    drift = Drift(100, reference())
    drift.add("s1", ("ACME", "M"), "A")
    drift.add("s1", ("ACME", "M"), "D")
    assert drift.unit(("ACME", "M"))["exams"] == 1 and drift.unit(("ACME", "M"))["shares"]["D"] == 1.0
    assert drift.add("s2", ("ACME", "M"), "") is None and drift.exams == 1  # not assessed: no call
    for i in range(MAX_UNITS + 10):
        drift.add(f"u{i}", (f"MAKER {i}", "M"), "B")
    units = {(u["manufacturer"], u["manufacturer_model"]) for u in drift.snapshot()["units"]}
    assert len(units) == MAX_UNITS + 1 and OTHER in units  # labels a sender cannot multiply


def test_the_unit_is_what_most_usable_images_say():
    rows = [
        {"status": "ok", "manufacturer": "ACME", "manufacturer_model": "M  1"},
        {"status": "ok", "manufacturer": "ACME", "manufacturer_model": "M  1"},
        {"status": "ok", "manufacturer": "OTHER", "manufacturer_model": "Y"},
        {"status": "skipped", "manufacturer": "RAW", "manufacturer_model": "Z"},
        {"status": "skipped", "manufacturer": "RAW", "manufacturer_model": "Z"},
    ]
    assert unit_of(rows) == ("ACME", "M 1")
    assert unit_of(rows[3:]) == (UNKNOWN, UNKNOWN) and unit_of([{"status": "ok"}]) == (UNKNOWN, UNKNOWN)
    assert len(unit_of([{"status": "ok", "manufacturer": "x" * 500}])[0]) == 64


def answered(state: State, study: str, density: str, maker: str = "ACME", model: str = "Mammo 1") -> None:
    """An exam of four images answered with ``density``, as a node records it."""
    rows = {}
    for i in range(4):
        sop = f"{study}.{i}"
        state.register(study, sop, state.spool_path(study, sop))
        rows[key("sop", sop)] = {"status": "ok", "manufacturer": maker, "manufacturer_model": model}
    state.set_rows(rows)
    assert state.answer(key("study", study), 4, f"{study}.99", None, density, ())


def test_the_windows_are_read_back_from_the_state(tmp_path):
    state = State(tmp_path / "state")
    try:
        for i in range(60):
            answered(state, f"1.2.{i}", "D")
        for i in range(10):
            answered(state, f"1.3.{i}", "B", "OTHERCO", "X")
        answered(state, "1.4", "")  # not assessed: no call
        live = Drift(500, reference())
        warned = live.load(state)
    finally:
        state.close()
    assert [(c.unit, c.warning) for c in warned] == [(("ACME", "Mammo 1"), True)]
    assert {(u["manufacturer"], u["exams"], u["verdict"]) for u in live.snapshot()["units"]} == {
        ("ACME", 60, OUTSIDE),
        ("OTHERCO", 10, TOO_FEW),
    }


def test_a_node_shows_the_drift_it_reads_back_and_warns_of_it(onnx_model, tmp_path):
    model = edited(
        onnx_model, tmp_path / "carded.onnx", lambda meta: meta["summary"].update(model_card=CARD), resign=True
    )
    state = State(tmp_path / "state")
    try:
        for i in range(60):
            answered(state, f"1.2.{i}", "D")  # an ACME unit whose exams all came back dense
    finally:
        state.close()
    token = secrets.token_urlsafe(12)
    args = ("--allow-aet", "PYNETDICOM", "--stable-seconds", "0.5", "--status-token-env", TOKEN_ENV)
    node = Node(tmp_path / "state", model, *args, env={TOKEN_ENV: token})
    try:
        study, files = make_study(tmp_path / "study", Manufacturer="OTHERCO", ManufacturerModelName="X")
        assert send(node.port, files) == [0, 0, 0, 0]
        wait_for("the study answered", lambda: node.answered(study))
        code, body, _ = get(node.status_port, "/status", token)
        drift = json.loads(body)["drift"]
        assert code == 200 and drift["window"] == 500 and drift["min_exams"] == 50
        assert drift["reference"]["dense_share"] == 0.38 and drift["reference"]["exams"] == 400
        units = {u["manufacturer"]: u for u in drift["units"]}
        assert units["ACME"]["verdict"] == OUTSIDE and units["ACME"]["exams"] == 60
        assert units["OTHERCO"]["verdict"] == TOO_FEW and units["OTHERCO"]["exams"] == 1
        found = samples(get(node.status_port, "/metrics", token)[1])
        assert value(found, "dens_serve_drift_warning", manufacturer="ACME", manufacturer_model="Mammo 1") == 1
        assert value(found, "dens_serve_drift_warning", manufacturer="OTHERCO", manufacturer_model="X") == 0
        assert value(found, "dens_serve_drift_dense_share", manufacturer="ACME", manufacturer_model="Mammo 1") == 1
        assert value(found, "dens_serve_drift_reference_dense_share") == 0.38
        low = value(found, "dens_serve_drift_expected_low", manufacturer="ACME", manufacturer_model="Mammo 1")
        assert 0 < low < 0.38
    finally:
        assert node.stop() == 0, node.log.read_text()[-3000:]
    assert "drift warning: ACME Mammo 1" in node.log.read_text()
    audit = [json.loads(line) for line in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
    (warning,) = [e for e in audit if e["event"] == "drift_warning"]
    assert warning["manufacturer"] == "ACME" and warning["exams"] == 60 and warning["dense_share"] == 1.0
    assert warning["reference"] == 0.38 and warning["expected"][1] < 1
    assert audit[0]["event"] == "node_started" and audit[0]["drift_reference"] == 0.38
    again = Node(tmp_path / "state", model, *args, env={TOKEN_ENV: token})  # the windows survive a restart
    try:
        drift = json.loads(get(again.status_port, "/status", token)[1])["drift"]
        assert {u["manufacturer"]: u["exams"] for u in drift["units"]} == {"ACME": 60, "OTHERCO": 1}
    finally:
        assert again.stop() == 0
