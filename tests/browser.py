"""Headless Chromium for the report tests: load a page and say whether every image loaded and the console
stayed clean (shared by the report and sweep tests)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")

# Appended to a copy of the report (the report itself has no script): records, once the page has
# loaded, how many images there are, which did not decode, and any error event (failed resource loads).
CHECK = """<script>
const errors = [];
window.addEventListener("error", e => errors.push(String(e.message || (e.target && (e.target.src || e.target.href)))), true);
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const out = document.createElement("pre");
  out.id = "check";
  out.textContent = JSON.stringify({n: imgs.length, bad: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt), errors});
  document.body.appendChild(out);
});
</script>"""


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp / 'chromium-profile'}", "--enable-logging=stderr", "--v=0", "--hide-scrollbars"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=90)


def check_in_browser(report: Path, tmp: Path) -> dict:
    """Load an instrumented copy of ``report``, screenshot it and dump its DOM; asserts a rendered page, no
    console message, every image decoded, no failed load. Returns the check record.

    One Chromium does both (its start-up, ~2 s, is most of the check's cost): the screenshot is taken and the
    DOM dumped once the page has loaded and the virtual time budget has run out."""
    shot = tmp / f"{report.parent.name}.png"
    probe = report.with_name("report.check.html")
    probe.write_text(report.read_text(encoding="utf-8").replace("</body>", CHECK + "</body>"), encoding="utf-8")
    res = _chromium(tmp, "--window-size=1280,2400", f"--screenshot={shot}", "--virtual-time-budget=10000",
                    "--dump-dom", probe.resolve().as_uri())
    probe.unlink()
    assert shot.is_file() and shot.stat().st_size > 20_000, res.stderr[-2000:]
    console = [line for line in res.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console
    found = re.search(r'<pre id="check">(.*?)</pre>', res.stdout, re.S)
    assert found, res.stderr[-2000:]
    check = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert check["n"] > 0 and check["bad"] == [] and check["errors"] == [], check
    return check
