"""The `sealbox` command as a user runs it (a real subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
