"""What people with Docker, and an installed wheel, rely on."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_compose_file_is_valid_and_pins_hapi_r4():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"hapi", "sandbox-ehr", "app"} <= set(services)
    image = services["hapi"]["image"]
    assert image.startswith("hapiproject/hapi:v8.") and not image.endswith(":latest")
    assert services["hapi"]["environment"]["hapi.fhir.fhir_version"] == "R4"
    for name in ("sandbox-ehr", "app"):
        assert services[name]["build"] == "."
        assert isinstance(services[name]["command"], list)


@pytest.fixture(scope="module")
def names(tmp_path_factory):
    """The files of the wheel ``pip wheel`` builds from this checkout (built once for these tests)."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    [wheel] = out.glob("fhir_plugin-*.whl")
    return set(zipfile.ZipFile(wheel).namelist())


def test_wheel_carries_the_profiles(names):
    for code in ("M62.561", "M62.830"):
        assert f"fhir_plugin/profiles/{code}/profile.json" in names
        assert f"fhir_plugin/profiles/{code}/plandefinition.json" in names
    for name in ("profile.schema.json", "profiles.json", "profiles.schema.json"):  # validated at load
        assert f"fhir_plugin/profiles/{name}" in names
    assert "sandbox/ehr/clients.example.json" in names
    # the command line, the population job and the app's routers are subpackages, listed in pyproject.toml
    assert {
        "fhir_plugin/_cli/population.py",
        "fhir_plugin/_population/_job.py",
        "smart_launch/routes/review.py",
    } <= set(names)


def test_wheel_carries_the_example_patients_and_type_hints(names):
    shipped = {
        f"fhir_plugin/profiles/M62.561/examples/{p.name}" for p in (ROOT / "profiles/M62.561/examples").iterdir()
    }
    assert shipped and shipped <= names  # the embedded default works from an installed wheel
    assert "fhir_plugin/py.typed" in names
