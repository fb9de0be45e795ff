"""deploy/Dockerfile, checked without Docker: the properties an image review asks for (slim,
pinned base; non-root numeric user; HEALTHCHECK on /livez; exec-form ENTRYPOINT and CMD;
SIGTERM; the configuration as a mount), the files it copies exist, and its HEALTHCHECK command
really tells a live admin listener from a dead one.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.proxy import ProxyFactory, free_port

from fastproxy import config

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"

Instruction = tuple[str, str]


def instructions(text: str) -> list[Instruction]:
    """(KEYWORD, arguments) per instruction: continuation lines joined, comments dropped."""
    result: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        keyword, _, rest = whole.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    assert not pending, "a continuation line ends the file"
    return result


def stages(parsed: list[Instruction]) -> list[list[Instruction]]:
    found: list[list[Instruction]] = []
    for keyword, rest in parsed:
        if keyword == "FROM":
            found.append([])
        if found:
            found[-1].append((keyword, rest))
    return found


def parsed() -> list[Instruction]:
    return instructions(DOCKERFILE.read_text())


def final_stage() -> list[Instruction]:
    return stages(parsed())[-1]


def only(stage: list[Instruction], keyword: str) -> str:
    values = [rest for k, rest in stage if k == keyword]
    assert len(values) == 1, f"expected one {keyword}, got {values}"
    return values[0]


def exec_form(value: str) -> list[str]:
    """The JSON array of an exec-form instruction; the shell form fails the test."""
    assert value.startswith("["), f"shell form: {value!r}"
    loaded = json.loads(value)
    assert isinstance(loaded, list) and all(isinstance(item, str) for item in loaded)
    return loaded


def test_dockerfile_parser_joins_continuations() -> None:
    text = "FROM a:1 AS b\n# c\nRUN x \\\n    && y\nUSER 1\n"
    assert instructions(text) == [("FROM", "a:1 AS b"), ("RUN", "x && y"), ("USER", "1")]


def test_base_images_are_slim_and_pinned() -> None:
    args = dict(
        rest.split("=", 1) for keyword, rest in parsed() if keyword == "ARG" and "=" in rest
    )
    images = [rest.split()[0] for keyword, rest in parsed() if keyword == "FROM"]
    assert len(images) == 2, images
    for image in images:
        resolved = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], image)
        name, _, tag = resolved.partition(":")
        assert name == "python", resolved
        assert tag and tag != "latest" and "latest" not in tag, resolved
        assert "-slim" in tag, resolved
        version = tuple(int(part) for part in tag.split("-")[0].split("."))
        assert version >= (3, 11), "pyproject: requires-python >= 3.11"


def test_runs_as_a_numeric_non_root_user() -> None:
    user = only(final_stage(), "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, user
    assert gid.isdigit() and int(gid) != 0, user
    # the image creates that user
    assert any(k == "RUN" and f"--uid {uid}" in rest for k, rest in final_stage())


def test_healthcheck_asks_livez_of_the_default_admin_bind() -> None:
    healthcheck = only(final_stage(), "HEALTHCHECK")
    options, _, command = healthcheck.partition("CMD ")
    assert "--interval=" in options and "--timeout=" in options
    argv = exec_form(command.strip())
    assert argv[0] == "/opt/fastproxy/bin/python"
    assert f"http://{config.DEFAULT_ADMIN_BIND}/livez" in argv[-1]


def test_entrypoint_is_exec_form_with_the_mounted_configuration() -> None:
    stage = final_stage()
    assert exec_form(only(stage, "ENTRYPOINT")) == ["/opt/fastproxy/bin/fastproxy"]
    assert exec_form(only(stage, "CMD")) == ["run", "-c", "/etc/fastproxy/fastproxy.toml"]
    assert only(stage, "STOPSIGNAL") == "SIGTERM"


def test_installs_the_source_tree_with_httptools() -> None:
    build = stages(parsed())[0]
    assert any(k == "RUN" and '"/src[httptools]"' in rest for k, rest in build)
    # the accelerated build: a compiler in the build stage only, and no silent fallback
    install = next(rest for k, rest in build if k == "RUN" and '"/src[httptools]"' in rest)
    assert install.startswith("FASTPROXY_BUILD=compiled ")
    assert any(k == "RUN" and "gcc" in rest for k, rest in build)
    assert not any(k == "RUN" and "gcc" in rest for k, rest in final_stage())
    copied = [rest.split()[:-1] for k, rest in build if k == "COPY"]
    assert copied
    for sources in copied:
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    ignore = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()
    for source in [s for sources in copied for s in sources]:
        assert f"!{source.rstrip('/')}" in {line.rstrip("/") for line in ignore}, source


def healthcheck_argv(port: int) -> list[str]:
    """The HEALTHCHECK command run by this test's Python, against ``port``."""
    healthcheck = only(final_stage(), "HEALTHCHECK")
    argv = exec_form(healthcheck.partition("CMD ")[2].strip())
    default_port = config.DEFAULT_ADMIN_BIND.rsplit(":", 1)[1]
    return [sys.executable, *argv[1:-1], argv[-1].replace(f":{default_port}/", f":{port}/")]


@pytest.mark.e2e
def test_healthcheck_command_against_a_live_admin_listener(proxy: ProxyFactory) -> None:
    running = proxy()
    ok = subprocess.run(healthcheck_argv(running.admin_port), timeout=30, check=False)
    assert ok.returncode == 0
    dead = subprocess.run(
        healthcheck_argv(free_port()), capture_output=True, timeout=30, check=False
    )
    assert dead.returncode != 0
