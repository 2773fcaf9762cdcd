"""No Docker engine runs here, so the images are checked statically: what they copy exists, they run as a
non-root user, and the command they run is one this package provides with a config it ships."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCKERFILES = sorted([*REPO.glob("*/Dockerfile"), *REPO.glob("docker/*/Dockerfile")])  # not into .venv


def instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", path.read_text())  # join continued lines
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_images_copy_only_what_exists_and_run_unprivileged(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    for op, args in steps:
        if op == "COPY" and "--from=" not in args:
            sources = [a for a in shlex.split(args) if not a.startswith("--")][:-1]
            for source in sources:
                assert (REPO / source).exists(), f"{dockerfile.name} copies {source}, which is not in the repository"
    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    for command in [json.loads(args) for op, args in steps if op == "CMD"]:  # every target's
        if command[0] == "llmops":
            assert command[1] in {"serve", "run", "monitor"}
            config = command[command.index("--config") + 1]
            assert (REPO / config).is_file()
        if command[0] == "sh":
            assert (REPO / command[1]).is_file(), f"{dockerfile.name} runs {command[1]}, which is not in the repository"


def test_the_serving_image_exists() -> None:
    assert REPO / "serving" / "Dockerfile" in DOCKERFILES


def test_the_serving_image_installs_every_package_the_llmops_command_needs() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    entry_package = project["project"]["scripts"]["llmops"].split(".")[0]
    copied = {
        Path(source).name
        for op, args in instructions(REPO / "serving" / "Dockerfile")
        if op == "COPY" and "--from=" not in args
        for source in [a for a in shlex.split(args) if not a.startswith("--")][:-1]
    }
    assert entry_package in packages
    assert packages <= copied, f"the image installs without {sorted(packages - copied)}"


def test_the_image_builds_the_llama_cpp_that_make_install_builds() -> None:
    """A GGUF champion is served from the image as from `make serve`: the same script and the same pin."""
    makefile = (REPO / "Makefile").read_text()
    pin = re.search(r"^LLAMA_CPP_PIN\s*:?=\s*(\S+)", makefile, re.MULTILINE)
    steps = instructions(REPO / "serving" / "Dockerfile")
    args = dict(arg.split("=", 1) for op, arg in steps if op == "ARG" and "=" in arg)
    assert pin is not None and args["LLAMA_CPP_PIN"] == pin.group(1)
    runs = [arg for op, arg in steps if op == "RUN"]
    assert any("build-llama-cpp.sh ${LLAMA_CPP_PIN} /opt/venv/llama.cpp /opt/venv/bin/python" in r for r in runs)
