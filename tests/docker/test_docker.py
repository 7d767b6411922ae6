"""docker/Dockerfile (GPU) and docker/Dockerfile.cpu, read without a Docker engine: hadolint
finds nothing, they pin what setup.cfg pins, run as a non-root user, copy only what exists
and is not ignored, and the entrypoint maps SLURM's variables onto the launch script's."""

import configparser
import fnmatch
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = [REPO / "docker" / "Dockerfile", REPO / "docker" / "Dockerfile.cpu"]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), " ".join(rest.split())))
        pending = ""
    return out


def pinned_in_setup_cfg() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    pins = {}
    for line in cfg["options"]["install_requires"].strip().splitlines():
        req = Requirement(line.strip())
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if exact:
            pins[req.name.lower()] = exact[0]
    return pins


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed (the test extra brings it)")
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile):
    out = subprocess.run(["hadolint", "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_image_installs_the_versions_setup_cfg_pins(dockerfile):
    pins = pinned_in_setup_cfg()
    assert {"torch", "torchaudio", "deepspeed"} <= set(pins)
    steps = instructions(dockerfile)
    args = dict(a.split("=", 1) for kind, a in steps if kind == "ARG" and "=" in a)
    versions = {name[:-len("_VERSION")].lower(): v for name, v in args.items() if name.endswith("_VERSION")}
    assert versions == pins, f"{dockerfile.name} ARGs {versions} != setup.cfg pins {pins}"
    runs = " ".join(a for kind, a in steps if kind == "RUN")
    for name in pins:  # each pinned wheel is installed by its ARG, never by another version
        assert f"{name}==${{{name.upper()}_VERSION}}" in runs
        assert not re.search(rf"\b{name}==\d", runs)
    base = next(a for kind, a in steps if kind == "FROM")
    assert re.fullmatch(r"python:3\.11-slim-\w+", base), base  # the Python of CI and the GPU machines
    assert re.search(r"pip install --no-cache-dir (-e )?'\.?/?\[", runs), runs  # then the package, by setup.cfg


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_image_runs_as_a_user_that_is_not_root(dockerfile):
    steps = instructions(dockerfile)
    users = [(i, a) for i, (kind, a) in enumerate(steps) if kind == "USER"]
    assert users, "no USER instruction: the container would run as root"
    last, user = users[-1]
    assert user.split(":")[0] not in ("root", "0")
    uid = user.split(":")[0]
    assert any(kind == "RUN" and "useradd" in a and f"--uid {uid}" in a for kind, a in steps[:last])
    assert all(kind not in ("RUN", "COPY", "ADD") for kind, _ in steps[last + 1:]), "USER comes after the build"
    assert [kind for kind, _ in steps[-2:]] == ["ENTRYPOINT", "CMD"]


def _ignored(path: str) -> bool:
    patterns = [p.strip().rstrip("/") for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    parts = Path(path).parts
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(parts[0], p) or
               (p.startswith("**/") and any(fnmatch.fnmatch(part, p[3:]) for part in parts)) for p in patterns)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copied_path_exists_and_is_not_ignored(dockerfile):
    for kind, arguments in instructions(dockerfile):
        if kind != "COPY":
            continue
        words = [w for w in arguments.split() if not w.startswith("--")]
        for source in words[:-1]:
            assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source}: no such path"
            assert source == "." or not _ignored(source), f"{dockerfile.name}: COPY {source} is in .dockerignore"
    for needed in ("runs", ".git", ".whl"):  # large or private: never in the build context
        assert _ignored(needed)


@pytest.mark.e2e
def test_the_entrypoint_maps_slurm_variables_and_runs_the_command():
    env = {k: v for k, v in os.environ.items() if k not in ("NNODES", "NODE_RANK")}
    out = subprocess.run([str(REPO / "docker" / "entrypoint.sh"), "bash", "-c", "echo $NNODES $NODE_RANK"],
                         env={**env, "SLURM_NNODES": "4", "SLURM_NODEID": "3"}, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0 and out.stdout.split() == ["4", "3"], out.stderr
    # set by hand, they win over SLURM's
    out = subprocess.run([str(REPO / "docker" / "entrypoint.sh"), "bash", "-c", "echo $NNODES $NODE_RANK"],
                         env={**env, "SLURM_NNODES": "4", "SLURM_NODEID": "3", "NNODES": "2", "NODE_RANK": "1"},
                         capture_output=True, text=True, timeout=30)
    assert out.stdout.split() == ["2", "1"]
    failed = subprocess.run([str(REPO / "docker" / "entrypoint.sh"), "bash", "-c", "exit 7"], env=env, timeout=30)
    assert failed.returncode == 7  # the command's own exit status
