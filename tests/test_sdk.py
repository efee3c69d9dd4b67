"""The SDK: sync and async surfaces match; the embedded path works end to end."""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator

import httpx

import pytest

from sealbox import AsyncSandbox, Sandbox, Secret
from sealbox.engine.spec import ExecResult
from sealbox.errors import CommandError, ConfigError, NotFoundError
from sealbox.guest.client import Output
from sealbox.sdk.async_sandbox import AsyncFiles, AsyncTemplate, AsyncVolume
from sealbox.sdk.sync_sandbox import Files, Template, Volume
from support.server import ADMIN_KEY, start_server


def public(cls: type) -> dict[str, inspect.Signature]:
    out = {}
    for name, member in inspect.getmembers(cls):
        if name.startswith("_") and name not in ("__enter__", "__exit__", "__aenter__",
                                                 "__aexit__"):
            continue
        if callable(member):
            out[name] = inspect.signature(member)
    return out


@pytest.mark.parametrize(("sync", "async_"), [(Sandbox, AsyncSandbox), (Files, AsyncFiles),
                                              (Volume, AsyncVolume), (Template, AsyncTemplate)])
def test_sync_surface_matches_async(sync: type, async_: type) -> None:
    s, a = public(sync), public(async_)
    a = {k.replace("__aenter__", "__enter__").replace("__aexit__", "__exit__"): v
         for k, v in a.items()}
    assert set(s) == set(a)
    for name in s:
        assert list(s[name].parameters) == list(a[name].parameters), name


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real server and a tenant key for it."""
    server = start_server(tmp_path_factory.mktemp("remote") / "data")
    try:
        resp = httpx.post(f"{server.url}/v1/keys", json={"tenant": "sdk"},
                          headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        resp.raise_for_status()
        yield {"url": server.url, "api_key": resp.json()["key"]}
    finally:
        assert server.stop()


@pytest.fixture(params=["embedded", "remote"])
def where(request: pytest.FixtureRequest) -> dict[str, str]:
    """Keyword arguments that point the same SDK code at an embedded engine or a server."""
    if request.param == "embedded":
        return {}
    remote: dict[str, str] = request.getfixturevalue("remote")
    return remote


def test_sync_roundtrip(where: dict[str, str]) -> None:
    with Sandbox.create(runtime="namespace", cpus=1, memory="512MiB", timeout=600,
                        **where) as sb:
        sb.files.write("/workspace/main.py", b"print('hi')")
        r = sb.exec("python3 main.py")
        assert (r.exit_code, r.stdout) == (0, "hi\n")
        assert sb.files.read("main.py") == b"print('hi')"
        assert [f.name for f in sb.files.list()] == ["main.py"]
        items = list(sb.exec_stream(["sh", "-c", "for i in 1 2 3; do echo $i; sleep 0.3; done"]))
        outs = [i for i in items if isinstance(i, Output)]
        assert b"".join(o.data for o in outs) == b"1\n2\n3\n"
        assert len(outs) >= 2, "output must stream in chunks, not arrive all at the end"
        assert isinstance(items[-1], ExecResult) and items[-1].exit_code == 0
        with pytest.raises(CommandError) as err:
            sb.exec("exit 3", check=True)
        assert err.value.result.exit_code == 3
        with pytest.raises(NotFoundError):
            sb.files.read("/workspace/missing")
        pty = sb.pty(rows=30, cols=100, cmd=["sh", "-c", "stty size; tty"])
        screen = b"".join(pty)
        assert b"30 100" in screen and b"/dev/pts/" in screen
        assert pty.wait() == 0
        bg = sb.exec("sleep 30", background=True)
        assert bg.exit_code is None and bg.pid
        sb.set_egress(["api.example.test"])
        assert sb.info.allow_net == ["api.example.test"]
        assert any(e["kind"] == "created" for e in sb.logs())
        if where:
            url = sb.expose(8000)["url"]
            assert url.startswith(f"http://8000-{sb.id}.localhost:")
        else:
            with pytest.raises(ConfigError, match="SEALBOX_URL"):
                sb.expose(8000)
        sid = sb.id
    again = Sandbox.connect(sid, **where)
    assert again.info.state.value == "killed"
    again.disconnect()


def test_stream_chunks_arrive_before_exit(where: dict[str, str]) -> None:
    with Sandbox.create(runtime="namespace", **where) as sb:
        arrivals = []
        for item in sb.exec_stream("echo first; sleep 1; echo second"):
            arrivals.append((time.monotonic(), item))
        first_out = next(t for t, i in arrivals if isinstance(i, Output))
        exit_at = arrivals[-1][0]
        # Not a budget: the first chunk must precede the exit by the sleep in the command.
        assert exit_at - first_out > 0.5


async def test_async_sandbox_and_secrets_placeholder() -> None:
    async with await AsyncSandbox.create(
        runtime="namespace", allow_net=["api.example.test"],
        secrets={"API_KEY": Secret("sk-real-value-123", hosts=["api.example.test"])},
    ) as sb:
        r = await sb.exec("printenv API_KEY")
        assert r.stdout.startswith("sealbox-secret-")
        assert "sk-real-value-123" not in r.stdout
        assert sb.info.secrets["API_KEY"].placeholder == r.stdout.strip()
        assert "sk-real" not in sb.info.model_dump_json()
        r = await sb.exec("cat /proc/self/environ /proc/1/environ | tr '\\0' '\\n' | grep -c sk-real || true")
        assert r.stdout.strip() == "0"


@pytest.mark.parametrize("kwargs", [
    {"memory": "lots"}, {"timeout": "forever"}, {"cpus": -1}, {"runtime": "docker"},
    {"env": {"1BAD": "x"}}, {"memory": "1MiB"},
])
def test_bad_options_raise_config_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as err:
        Sandbox.create(**kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(err.value)
