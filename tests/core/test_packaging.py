"""The wheel: built from the repository, it holds every subpackage and the tuned tables, and the
installed copy imports and finds its tables (jaxquant.core.tuned reads package data)."""

import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    ROOT], check=True, capture_output=True, text=True)
    (path,) = out.glob("jaxquant-*.whl")
    return path


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    tables = {n for n in names if n.startswith("jaxquant/tuned/")}
    assert {"jaxquant/tuned/h200/weight_only.json", "jaxquant/tuned/h200/int8_matmul.json"} <= tables
    for pkg in ("core", "primitives/affine", "primitives/dynamic", "primitives/lsq", "primitives/int8_matmul",
                "primitives/weight_only", "pallas/affine", "pallas/dynamic", "pallas/lsq", "pallas/int8_matmul",
                "pallas/weight_only", "pallas/fp8_matmul", "flax", "models", "bench"):
        assert f"jaxquant/{pkg}/__init__.py" in names, pkg
    meta = next(n for n in names if n.endswith("METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    assert "Requires-Python: >=3.11" in text


def test_installed_wheel_imports_and_reads_its_tables(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, text=True)
    code = ("import jaxquant, jaxquant.flax; from jaxquant.core import tuned; "
            "print(jaxquant.__file__); print(len(tuned.table('weight_only')['table']), "
            "len(tuned.table('int8_matmul')['table']))")
    env = dict(os.environ, PYTHONPATH=str(target), JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, capture_output=True, text=True)
    file, counts = r.stdout.strip().splitlines()[-2:]
    assert file.startswith(str(target)), file
    assert all(int(c) > 0 for c in counts.split())
