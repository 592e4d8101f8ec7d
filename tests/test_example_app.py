"""The example application package (examples/presence), as its user would have it: pip
installs it into a fresh virtual environment outside mpd's tree, and mpd serves it by its
entry point's name and by `package.module:factory`; the package's own tests pass there.

Fast and offline: the new venv reuses this one's packages (mpd, its dependencies, pytest,
setuptools) through a .pth file, and pip builds the example with --no-index and
--no-build-isolation."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import ROOT, Mpd

EXAMPLE = ROOT / "examples" / "presence"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the new venv's python, the copy of the example it was installed from)."""
    setuptools = pytest.importorskip("setuptools", reason="pyproject's test extra has it")
    if tuple(int(n) for n in setuptools.__version__.split(".")[:2]) < (70, 1):
        pytest.skip(f"setuptools {setuptools.__version__} cannot build a wheel without the "
                    "wheel package; scripts/setup test installs setuptools>=70.1")
    home = tmp_path_factory.mktemp("example")
    venv = home / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=60)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"], check=True,
                             capture_output=True, text=True, timeout=30).stdout.strip()
    ours = sysconfig.get_paths()["purelib"]  # addsitedir: its own .pth files count too
    (Path(purelib) / "reuse-test-venv.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    source = home / "src" / "presence"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns(
        "__pycache__", "build", "*.egg-info", ".pytest_cache"))
    pip = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps",
                          "--no-index", "--no-build-isolation", str(source)],
                         capture_output=True, text=True, timeout=300, cwd=home)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    return python, source


def run(python: Path, code: str, cwd: Path) -> str:
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                            timeout=60, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_example_is_installed_outside_mpds_tree_with_its_entry_point(installed):
    python, source = installed
    where = run(python, "import mpd_presence; print(mpd_presence.__file__)", source.parent)
    assert where.startswith(str(python.parent.parent)) and not where.startswith(str(ROOT))
    assert run(python, "from mpd.apps import loader; print(loader.entry_point('presence'))",
               source.parent) == "mpd_presence.app:application"


def test_the_examples_own_tests_pass_where_it_is_installed(installed, tmp_path):
    python, source = installed
    tests = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "--basetemp", str(tmp_path / "inner"), str(source / "tests")],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    assert "\n3 passed in " in tests.stdout, tests.stdout  # none skipped


@pytest.mark.parametrize("protocol", ["presence", "mpd_presence.app:application"])
def test_mpd_serves_the_installed_example_by_name_and_by_module(installed, tmp_path, protocol):
    python, _ = installed
    server = Mpd(tmp_path, {"server": {"protocol": protocol}, "workers": {"workers": 2},
                            "app": {"interval": 60}}, python=str(python), cwd=tmp_path)
    try:
        with server.connect() as ada, server.connect() as bob:
            ada.sendall(b"JOIN hall ada\n")
            assert read_line(ada) == b"* you are ada in hall; here: ada"
            bob.sendall(b"JOIN hall bob\nhello\n")
            assert read_line(bob) == b"* you are bob in hall; here: ada, bob"
            assert read_line(ada) == b"* bob joined"
            assert read_line(ada) == b"bob: hello"
        assert {e["protocol"] for e in server.events("worker.serving")} == {"presence"}
    finally:
        server.stop()


def read_line(sock) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    return data[:-1]
