"""The `sealbox` command as a user runs it (a real subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.server import ADMIN_KEY, start_server

SEALBOX = str(Path(sys.executable).parent / "sealbox")


def sealbox(*args: str, env: dict[str, str] | None = None, timeout: float = 90
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SEALBOX, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_run_prints_and_exits_with_command_code(tmp_path: Path) -> None:
    env = {"SEALBOX_DATA_DIR": str(tmp_path)}
    r = sealbox("run", "--runtime", "namespace", "--", "python3", "-c", "print(6*7)", env=env)
    assert (r.returncode, r.stdout) == (0, "42\n"), r.stderr
    r = sealbox("run", "--runtime", "namespace", "--", "sh", "-c", "echo err >&2; exit 7", env=env)
    assert (r.returncode, r.stderr) == (7, "err\n")


def test_run_memory_limit_message(tmp_path: Path) -> None:
    r = sealbox("run", "--runtime", "namespace", "--memory", "256MiB", "--timeout", "30s", "--",
                "python3", "-c", "x = bytearray(10**9)", env={"SEALBOX_DATA_DIR": str(tmp_path)})
    assert r.returncode != 0
    assert "sealbox: killed: out of memory (limit 256 MiB)" in r.stderr


def test_run_timeout_message(tmp_path: Path) -> None:
    r = sealbox("run", "--runtime", "namespace", "--timeout", "2s", "--", "sleep", "60",
                env={"SEALBOX_DATA_DIR": str(tmp_path)})
    assert r.returncode == 124
    assert "timeout" in r.stderr


@pytest.mark.parametrize(("args", "needle"), [
    (["run", "--memory", "lots", "--", "true"], "memory"),
    (["run", "--timeout", "soon", "--", "true"], "duration"),
    (["run", "--secret", "NOPE_NOT_SET@api.example.test", "--", "true"], "NOPE_NOT_SET"),
    (["run", "--secret", "justaname", "--", "true"], "NAME@HOST"),
    (["run", "--env", "novalue", "--", "true"], "KEY=VALUE"),
    (["run", "--runtime", "docker", "--", "true"], "runtime"),
    (["run", "--resolve", "bad", "--", "true"], "resolve"),
    (["ls"], "SEALBOX_URL"),
])
def test_bad_input_is_one_clear_line(tmp_path: Path, args: list[str], needle: str) -> None:
    env = {"SEALBOX_DATA_DIR": str(tmp_path), "SEALBOX_URL": ""}
    r = sealbox(*args, env=env)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert needle.lower() in r.stderr.lower(), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_doctor_lists_tiers() -> None:
    r = sealbox("doctor")
    assert r.returncode == 0
    assert r.stdout.splitlines()[0].split()[:2] == ["namespace", "ok"]
    assert any(line.startswith("gvisor") for line in r.stdout.splitlines())
    # What a Debian base needs is said too (scripts/setup installs it).
    assert r.stdout.splitlines()[-1].split()[:2] == ["debian", "ok"], r.stdout


@pytest.fixture(scope="module")
def server_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    server = start_server(tmp_path_factory.mktemp("cli") / "data")
    try:
        yield {"SEALBOX_URL": server.url, "SEALBOX_API_KEY": ADMIN_KEY}
    finally:
        assert server.stop()


def test_remote_lifecycle(server_env: dict[str, str], tmp_path: Path) -> None:
    r = sealbox("create", "--runtime", "namespace", "--memory", "256MiB", env=server_env)
    assert r.returncode == 0, r.stderr
    sid = r.stdout.split()[-1]
    assert sid.startswith("sb")
    r = sealbox("exec", sid, "--", "sh", "-c", "echo out; echo err >&2; exit 5", env=server_env)
    assert (r.returncode, r.stdout, r.stderr) == (5, "out\n", "err\n")
    src = tmp_path / "data.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024))
    assert sealbox("cp", str(src), f"{sid}:/workspace/", env=server_env).returncode == 0
    back = tmp_path / "back.bin"
    r = sealbox("cp", f"{sid}:/workspace/data.bin", str(back), env=server_env)
    assert r.returncode == 0, r.stderr
    assert back.read_bytes() == src.read_bytes()
    r = sealbox("ls", env=server_env)
    assert sid in r.stdout
    r = sealbox("exec", sid, "--", "sh", "-c", "getent hosts blocked.example.test || echo nx",
                env=server_env)
    assert r.stdout.strip() == "nx"
    r = sealbox("logs", "--egress", sid, env=server_env)
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert any(e["kind"] == "dns_blocked" and "blocked.example.test" in json.dumps(e)
               for e in events), events
    r = sealbox("policy", "suggest", "--json", sid, env=server_env)
    suggestion = json.loads(r.stdout)
    assert suggestion["allow_net"] == [] and list(suggestion["blocked"]) == ["blocked.example.test"]
    r = sealbox("logs", sid, env=server_env)
    assert any(json.loads(line)["kind"] == "exec" for line in r.stdout.splitlines())
    shell = subprocess.run([SEALBOX, "shell", sid], input="echo shell-$((6*7)); exit 3\n",
                           capture_output=True, text=True, timeout=60,
                           env={**os.environ, **server_env})
    assert shell.returncode == 3, shell.stderr
    assert "shell-42" in shell.stdout
    assert sealbox("kill", sid, env=server_env).returncode == 0
    r = sealbox("exec", sid, "--", "true", env=server_env)
    assert r.returncode == 1 and "killed" in r.stderr and "Traceback" not in r.stderr


def test_remote_errors_are_one_line(server_env: dict[str, str]) -> None:
    r = sealbox("exec", "sbnotthere00000", "--", "true", env=server_env)
    assert r.returncode == 1 and "no sandbox" in r.stderr and len(r.stderr.splitlines()) == 1
    r = sealbox("ls", env={**server_env, "SEALBOX_API_KEY": "sbk_wrong"})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    r = sealbox("cp", "/nonexistent/file", "sbx:/workspace/", env=server_env)
    assert r.returncode == 2
