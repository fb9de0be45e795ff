"""deploy/fastproxy.toml: the example edge configuration passes ``fastproxy check``.

The file names the certificate where an edge host keeps it (/etc/fastproxy/tls.crt); the test
issues a real one with trustme into its temporary directory and points a copy of the file at it,
so ``check`` reads, parses and matches real PEM files without touching /etc.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from support.certs import Authority

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "fastproxy.toml"
CERT = "/etc/fastproxy/tls.crt"
KEY = "/etc/fastproxy/tls.key"


def fastproxy_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastproxy", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def with_certificates(text: str, cert: str, key: str, tmp_path: Path) -> Path:
    """A copy of ``text`` whose ``cert``/``key`` paths name a fresh certificate and key."""
    assert cert in text and key in text, "the configuration no longer names its certificate"
    pair = Authority(tmp_path / "pki").issue("gateway.example.com")
    copy = tmp_path / "fastproxy.toml"
    copy.write_text(text.replace(cert, str(pair.cert)).replace(key, str(pair.key)))
    return copy


def test_example_config_passes_check(tmp_path: Path) -> None:
    copy = with_certificates(EXAMPLE.read_text(), CERT, KEY, tmp_path)
    result = fastproxy_check(copy)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == f"{copy}: ok (2 listeners, 1 upstream)\n"


def test_example_config_check_reads_the_certificate(tmp_path: Path) -> None:
    """The check above is a real one: a certificate file that is not there fails it."""
    copy = tmp_path / "fastproxy.toml"
    missing = tmp_path / "missing.crt"
    copy.write_text(EXAMPLE.read_text().replace(CERT, str(missing)))
    result = fastproxy_check(copy)
    assert result.returncode == 1
    assert "listeners.sdk.tls.cert" in result.stderr
    assert str(missing) in result.stderr


def test_example_config_keeps_spec_3_shape() -> None:
    """SPEC 3: the example works as written; these keys stay."""
    text = EXAMPLE.read_text()
    for line in (
        "[upstreams.cobrowse]",
        "[listeners.sdk]",
        'policy = "cobrowse-sdk"',
        f'tls = {{ cert = "{CERT}", key = "{KEY}" }}',
        "[listeners.agent]",
        'policy = "cobrowse-agent"',
        "[admin]",
        'bind = "127.0.0.1:9901"',
        "[presets.cobrowse]",
        "health = {",
    ):
        assert line in text, line
