"""The container image, without a Docker engine: hadolint, focused Dockerfile checks, lock files, and the
Dockerfile's install steps replayed into a clean venv that then runs the agent from a read-only tree.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .conftest import REPO

DOCKERFILE = REPO / "Dockerfile"


def hadolint(path: Path) -> list[dict[str, object]]:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    proc = subprocess.run([exe, "--format", "json", "--no-fail", str(path)],
                          capture_output=True, text=True, timeout=60, check=True)
    findings: list[dict[str, object]] = json.loads(proc.stdout or "[]")
    return findings


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def locked(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, sha256 hashes) from a pip-compile style lock file."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pin, *options = line.split()
        name, _, version = pin.partition("==")
        out[canonicalize_name(name)] = (version, [o.removeprefix("--hash=sha256:") for o in options])
    return out


# ------------------------------------------------------------------ lint

def test_hadolint_finds_nothing() -> None:
    assert hadolint(DOCKERFILE) == []


def test_hadolint_is_live(tmp_path: Path) -> None:
    """The same Dockerfile without its pip/apt hygiene is reported: the clean result above means something."""
    sloppy = DOCKERFILE.read_text().replace("--no-cache-dir ", "").replace("libudev1=252.*", "libudev1")
    (tmp_path / "Dockerfile").write_text(sloppy)
    codes = {f["code"] for f in hadolint(tmp_path / "Dockerfile")}
    assert {"DL3042", "DL3008"} <= codes


def test_base_image_is_a_pinned_slim_python_311() -> None:
    (arg,) = [a for i, a in instructions() if i == "ARG" and a.startswith("PYTHON_IMAGE=")]
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", arg), arg
    froms = [a for i, a in instructions() if i == "FROM"]
    assert froms == ["--platform=$BUILDPLATFORM ${PYTHON_IMAGE} AS wheel", "${PYTHON_IMAGE}"]


def test_runtime_stage_suits_a_read_only_privileged_pod() -> None:
    steps = instructions()
    runtime = steps[max(n for n, (i, _) in enumerate(steps) if i == "FROM"):]
    env = " ".join(a for i, a in runtime if i == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    runs = [a for i, a in runtime if i == "RUN"]
    assert any("libudev1" in r and "rm -rf /var/lib/apt/lists/*" in r for r in runs)
    (pip,) = [r for r in runs if "pip install" in r]
    assert "--require-hashes" in pip and "/tmp/requirements.lock" in pip and "--no-cache-dir" in pip
    assert "pip check" in pip
    assert [a for i, a in runtime if i == "ENTRYPOINT"] == ['["sriov-rdma-agent", "serve"]']
    assert not [a for i, a in runtime if i == "USER"], "the agent must be root to write sysfs"


def test_no_architecture_specific_steps() -> None:
    for word, args in instructions():
        if word == "RUN":
            assert not re.search(r"amd64|arm64|aarch64|x86_64|uname|TARGETARCH", args), args


def test_dockerignore_lets_every_copied_file_through() -> None:
    """.dockerignore is an allow-list; every COPY source must be on it or the build fails."""
    lines = (REPO / ".dockerignore").read_text().splitlines()
    allowed = {line.strip().lstrip("!").rstrip("/") for line in lines if line.startswith("!")}
    copies = [a.split()[:-1] for i, a in instructions() if i == "COPY"]
    copied = [src for sources in copies for src in sources if not src.startswith("--")]
    bound = re.findall(r"--mount=type=bind,source=([^,\s]+),target", DOCKERFILE.read_text())
    assert copied and bound
    for src in copied + bound:
        assert src in allowed, f"{src} is copied but .dockerignore drops it"
        assert (REPO / src).exists(), src


# ------------------------------------------------------------------ lock files

def test_lock_files_pin_what_pyproject_asks_for() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    for lock, wanted in ((REPO / "requirements.lock", project["project"]["dependencies"]),
                         (REPO / "requirements-build.lock", project["build-system"]["requires"])):
        pins = locked(lock)
        for text in wanted:
            req = Requirement(text)
            version, hashes = pins[canonicalize_name(req.name)]
            assert req.specifier.contains(version), f"{lock.name}: {req.name}=={version} vs {req.specifier}"
            assert hashes and all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), req.name
    runtime = locked(REPO / "requirements.lock")
    # Compiled packages need one wheel per image architecture.
    for name in ("grpcio", "protobuf", "pyyaml"):
        assert len(runtime[name][1]) >= 2, f"{name}: hashes for amd64 and arm64 wheels expected"


def test_lock_holds_the_hashes_of_the_arm64_wheels(tmp_path: Path) -> None:
    """The DGX Spark image (linux/arm64) installs with --require-hashes too: pip, asked for the wheels a
    CPython 3.11 on bookworm's glibc (2.36) picks, finds each one's hash in the lock."""
    tags = [arg for tag in ("manylinux2014_aarch64", "manylinux_2_28_aarch64", "manylinux_2_36_aarch64")
            for arg in ("--platform", tag)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                    "--no-deps", "--require-hashes", "--only-binary=:all:", *tags, "--python-version", "3.11",
                    "--implementation", "cp", "--abi", "cp311", "-d", str(tmp_path),
                    "-r", str(REPO / "requirements.lock")], check=True, capture_output=True, timeout=300)
    wheels = sorted(canonicalize_name(w.name.split("-")[0]) for w in tmp_path.glob("*.whl"))
    assert wheels == sorted(locked(REPO / "requirements.lock"))
    (grpcio,) = tmp_path.glob("grpcio-*.whl")
    assert grpcio.name.endswith("aarch64.whl")


# ------------------------------------------------------------------ the install step, replayed

def pip(venv: Path, *args: str | Path) -> str:
    cmd = [str(venv / "bin/python"), "-m", "pip", "--disable-pip-version-check", *map(str, args)]
    # As the image's ENV: bytecode is still compiled at install time, never at run time.
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, env=env)
    assert proc.returncode == 0, f"pip {' '.join(map(str, args))}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean venv built as the Dockerfile builds the image: locked build deps, the wheel, locked deps."""
    work = tmp_path_factory.mktemp("image")
    context = work / "context"  # what .dockerignore lets into the build context
    context.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, context / name)
    shutil.copytree(REPO / "agent", context / "agent", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    build, runtime = work / "build", work / "runtime"
    for venv in (build, runtime):
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # stage "wheel"
    pip(build, "install", "--require-hashes", "--only-binary=:all:", "-r", REPO / "requirements-build.lock")
    pip(build, "wheel", "--no-build-isolation", "--no-deps", "--wheel-dir", work / "dist", context)
    # runtime stage
    pip(runtime, "install", "--require-hashes", "--only-binary=:all:", "--no-deps",
        "-r", REPO / "requirements.lock")
    (wheel,) = (work / "dist").glob("sriov_rdma_agent-*.whl")
    pip(runtime, "install", "--no-index", "--no-deps", wheel)
    pip(runtime, "check")
    return runtime


def test_image_holds_only_locked_packages_and_the_agent(image_venv: Path) -> None:
    listed = json.loads(pip(image_venv, "list", "--format", "json"))
    installed = {canonicalize_name(p["name"]) for p in listed}
    expected = set(locked(REPO / "requirements.lock")) | {"sriov-rdma-agent"}
    assert expected <= installed
    assert installed - expected <= {"pip", "setuptools", "wheel"}, "test or build tools leaked into the image"


def test_bytecode_is_compiled_at_install_time(image_venv: Path) -> None:
    """With a read-only root Python cannot cache bytecode, so the install must have done it."""
    (site,) = image_venv.glob("lib/python3*/site-packages")
    for module in ("agent/cli.py", "agent/app.py", "grpc/__init__.py"):
        source = site / module
        assert list((source.parent / "__pycache__").glob(source.stem + ".*.pyc")), module


def test_installed_entry_point_offers_serve_with_its_flags(image_venv: Path) -> None:
    exe = image_venv / "bin/sriov-rdma-agent"
    def run(*args: str) -> str:
        return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60, check=True).stdout

    top = run("--help")
    assert "serve" in top and "demo" in top
    serve = run("serve", "--help")
    for flag in ("--config", "--sysfs-root", "--dev-root", "--device-plugin-dir", "--devinfo-dir",
                 "--pod-resources-socket", "--metrics-address", "--health-address", "--node-name"):
        assert flag in serve, flag


def test_installed_agent_runs_the_demo_from_a_read_only_install(image_venv: Path) -> None:
    """readOnlyRootFilesystem: the installed tree is mounted read-only and nothing in it changes."""
    before = {p: p.stat().st_mtime_ns for p in image_venv.rglob("*")}
    cmd: list[str | Path] = [image_venv / "bin/sriov-rdma-agent", "demo", "--once"]
    if os.geteuid() == 0 and shutil.which("unshare"):
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" "$1" && shift && exec "$@"',
               "sh", image_venv, *cmd]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False,
                          cwd=image_venv.parent)  # not the repo: only the installed package is importable
    assert proc.returncode == 0, proc.stderr
    assert "allocatable: 4 of 4" in proc.stdout
    assert "PCIDEVICE_NVIDIA_COM_CX7_QSFP=" in proc.stdout
    after = {p: p.stat().st_mtime_ns for p in image_venv.rglob("*")}
    assert after == before
