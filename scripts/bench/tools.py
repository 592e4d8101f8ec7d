"""The programs the benchmark runs besides mpd: the C load generator and C baseline (built
with cc at run time), the seed's mpclient2 (extracted from the seed article and built with
g++), and the interpreters: one for mpd and the Python baselines, one with uvloop."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from common import HERE, ROOT, progress

SEED = Path(os.environ.get("MPD_SEED", "/work/shared/seed/000_9156ad83d542a1c1.txt"))
TOOLS_VENV = ROOT / "bench-results" / "tools-venv"  # matplotlib, py-spy, uvloop: not mpd's


class Tools:
    def __init__(self, build_dir: Path, mpd_python: str, use_cc: bool = True,
                 uvloop_python: str | None = None):
        self.build_dir = build_dir
        self.mpd_python = mpd_python
        self.cc = (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
                   if use_cc else None)
        self.cxx = shutil.which("g++") or shutil.which("c++") if use_cc else None
        self.loadgen: list[str] = []
        self.baseline_c: list[str] | None = None
        self.mpclient2: str | None = None
        self.mpclient2_missing = ""  # why there is none
        self.uvloop_python = find_python_with("uvloop", uvloop_python, mpd_python,
                                              str(TOOLS_VENV / "bin" / "python"))
        self.cc_version = ""
        self.built: dict[str, str] = {}  # build_c's programs

    def build(self) -> None:
        self.build_dir.mkdir(parents=True, exist_ok=True)
        if self.cc:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                self.cc_version = subprocess.run([self.cc, "--version"], capture_output=True,
                                                 text=True, timeout=10).stdout.splitlines()[0]
            for name in ("loadgen", "baseline_epoll"):
                out = self.build_dir / name
                cmd = [self.cc, "-O2", "-Wall", "-o", str(out), str(HERE / f"{name}.c")]
                progress(f"build: {' '.join(cmd)}")
                subprocess.run(cmd, check=True, timeout=120)
            self.loadgen = [str(self.build_dir / "loadgen")]
            self.baseline_c = [str(self.build_dir / "baseline_epoll")]
        else:
            progress("build: no C compiler: Python load generator, no C baseline")
            self.loadgen = [self.mpd_python, str(HERE / "loadgen.py")]

    def build_c(self, name: str) -> str | None:
        """scripts/bench/NAME.c built as build() builds its programs (None without cc)."""
        if not self.cc:
            return None
        if name not in self.built:
            self.build_dir.mkdir(parents=True, exist_ok=True)
            out = self.build_dir / name
            cmd = [self.cc, "-O2", "-Wall", "-o", str(out), str(HERE / f"{name}.c")]
            progress(f"build: {' '.join(cmd)}")
            subprocess.run(cmd, check=True, timeout=120)
            self.built[name] = str(out)
        return self.built[name]

    def build_mpclient2(self) -> str | None:
        """The seed's mpclient2, built on first use; None (and mpclient2_missing says why)
        without g++ or the seed."""
        if self.mpclient2 or self.mpclient2_missing:
            return self.mpclient2
        if not self.cxx:
            self.mpclient2_missing = "no C++ compiler (g++)"
        elif not SEED.exists():
            self.mpclient2_missing = f"the seed article {SEED} is not here (set MPD_SEED)"
        else:
            source = self.build_dir / "mpclient2.cpp"
            source.write_text(seed_program("mpclient2"), encoding="utf-8")
            out = self.build_dir / "mpclient2"
            cmd = [self.cxx, "-O2", "-o", str(out), str(source)]
            progress(f"build: {' '.join(cmd)}")
            subprocess.run(cmd, check=True, timeout=120, capture_output=True)
            self.mpclient2 = str(out)
        if self.mpclient2_missing:
            progress(f"build: no mpclient2: {self.mpclient2_missing}")
        return self.mpclient2


def seed_program(name: str, seed: Path = SEED) -> str:
    """The C++ source of `name` from the seed article, where each code line is prefixed with
    "- ": from the line "- // NAME —— ..." up to the last code line before the article's
    text resumes. (tests/conftest.py reads the seed's clients the same way.)"""
    lines = seed.read_text(encoding="utf-8").splitlines()
    start = next((i for i, line in enumerate(lines)
                  if line.startswith(f"- // {name} ") and "——" in line), None)
    if start is None:
        raise LookupError(f"no program {name!r} in {seed}")
    code = []
    for line in lines[start:]:
        if not line.startswith("- "):
            break
        code.append(line[2:])
    return "\n".join(code) + "\n"


def find_mpd_python(requested: str | None) -> str:
    if requested:
        return requested
    python = find_python_with("mpd.cli", None, sys.executable,
                              *(str(ROOT / v / "bin" / "python")
                                for v in (".venv", ".ci-venv-3.11", ".ci-venv-3.13",
                                          ".ci-venv-3.9")))
    if python is None:
        raise SystemExit("bench: no Python that can import mpd; pass --mpd-python")
    return python


def find_python_with(module: str, requested: str | None, *candidates: str) -> str | None:
    """The first interpreter that imports `module`: `requested` alone if given, else the
    first of the candidates that does."""
    for python in [requested] if requested else candidates:
        if python is None or not os.path.exists(python):
            continue
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            if subprocess.run([python, "-c", f"import {module}"], cwd=ROOT, timeout=30,
                              capture_output=True).returncode == 0:
                return python
    return None
