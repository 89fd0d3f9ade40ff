"""Bad input gives one clear sentence and a non-zero exit, or a report — never a traceback, never a write."""

import json

import responses
from test_check_cases import CASES, TODAY

from fhir_plugin._cli import main

BASE = "http://fhir.test/fhir"


def _case(key):
    return next(c for c in CASES if c.key == key)


def _bundle(resources):
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_malformed_json(tmp_path, capsys):
    path = _write(tmp_path, "bad.json", '{"resourceType": "Bundle", "entry": [')
    code, out, err = _run(capsys, "check", "--bundle", path)
    assert code == 4 and out == ""
    assert err.strip().startswith("fhir-plugin: ") and "is not valid JSON (line 1" in err
    assert len(err.strip().splitlines()) == 1


def test_bundle_of_the_wrong_resource_types(tmp_path, capsys):
    path = _write(
        tmp_path,
        "meds.json",
        _bundle([{"resourceType": "Medication", "id": "m1"}, {"resourceType": "Device", "id": "d1"}]),
    )
    code, _out, err = _run(capsys, "propose", "--bundle", path)
    assert code == 4 and "holds no Patient, Condition, Observation or Encounter (found Device, Medication)" in err


def test_r5_shaped_encounter(tmp_path, capsys):
    resources = [dict(r) for r in _case("complete").resources]
    encounter = next(r for r in resources if r["resourceType"] == "Encounter")
    encounter["class"] = [{"coding": [encounter["class"]]}]  # R5: class is a list of CodeableConcept
    path = _write(tmp_path, "r5.json", _bundle(resources))
    code, _out, err = _run(capsys, "check", "--bundle", path)
    assert code == 4
    assert f"Encounter/{encounter['id']} is not valid FHIR R4 at class" in err


def test_condition_without_subject(tmp_path, capsys):
    resources = [dict(r) for r in _case("complete").resources]
    condition = next(r for r in resources if r["resourceType"] == "Condition")
    del condition["subject"]
    path = _write(tmp_path, "nosubject.json", _bundle(resources))
    code, _out, err = _run(capsys, "check", "--bundle", path)
    # a Condition must have a subject in R4, so the model refuses it before grouping does
    assert code == 4 and f"Condition/{condition['id']}" in err and "subject" in err


def test_one_megabyte_note_still_gives_a_report(tmp_path, capsys):
    resources = [dict(r) for r in _case("complete").resources]
    condition = next(r for r in resources if r["resourceType"] == "Condition")
    condition["note"] = list(condition.get("note", [])) + [{"text": ("Filler text without findings. " * 35000)}]
    path = _write(tmp_path, "big.json", _bundle(resources))
    code, out, _err = _run(capsys, "check", "--bundle", path, "--format", "json", "--today", TODAY.isoformat())
    report = json.loads(out)
    assert code == 0 and report["complete"] is True


def test_unknown_patient_in_files_and_unknown_encounter(tmp_path, capsys):
    path = _write(tmp_path, "c.json", _bundle(_case("complete").resources))
    code, _out, err = _run(capsys, "check", "--bundle", path, "--patient", "nobody")
    assert code == 7 and "Patient/nobody is not in" in err
    pid = _case("complete").patient_id
    code, _out, err = _run(capsys, "check", "--bundle", path, "--patient", pid, "--encounter", "nope")
    assert code == 2 and "Encounter/nope is not in the record" in err


def test_unreachable_server(capsys):
    code, _out, err = _run(capsys, "check", "--server", "http://127.0.0.1:9/fhir", "--patient", "x", "--timeout", "2")
    assert code == 5 and "could not reach http://127.0.0.1:9/fhir" in err


@responses.activate
def test_bad_token_is_one_sentence_and_never_echoed(capsys):
    responses.post(
        BASE,
        status=401,
        json={
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "login", "diagnostics": "Invalid token"}],
        },
    )
    code, out, err = _run(capsys, "check", "--server", BASE, "--patient", "p1", "--token", "s3cret-token")
    assert code == 8 and "Invalid token" in err and "s3cret-token" not in out + err


@responses.activate
def test_malformed_server_data_is_reported_and_nothing_is_written(capsys):
    case = _case("complete")
    resources = [dict(r) for r in case.resources]
    bad = next(r for r in resources if r["resourceType"] == "Encounter")
    bad["class"] = [{"coding": [bad["class"]]}]

    def searchset(rtype):
        return {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [{"resource": r} for r in resources if r["resourceType"] == rtype],
        }

    patient = next(r for r in resources if r["resourceType"] == "Patient")
    batch = {
        "resourceType": "Bundle",
        "type": "batch-response",
        "entry": [
            {"resource": patient, "response": {"status": "200 OK"}},
            *(
                {"resource": searchset(t), "response": {"status": "200 OK"}}
                for t in ("Condition", "Observation", "Encounter", "CarePlan", "DocumentReference")
            ),
        ],
    }
    responses.post(BASE, json=batch)
    code, _out, err = _run(capsys, "propose", "--server", BASE, "--patient", case.patient_id, "--write")
    assert code == 4 and "not valid FHIR R4" in err
    assert len(responses.calls) == 1  # the batch read only: no transaction was sent
    assert json.loads(responses.calls[0].request.body)["type"] == "batch"


def test_unknown_profile_and_conflicting_sources(capsys):
    code, _out, err = _run(capsys, "check", "--profile", "Z99.89")
    assert code == 2 and "no profile for Z99.89" in err
    code, _out, err = _run(capsys, "propose", "--write")
    assert code == 2 and "--write needs --server" in err
    code, _out, err = _run(capsys, "check", "--server", BASE)
    assert code == 2 and "--patient" in err
