"""``make bench --upstream iso-host`` (issue 24): the gateway forwarding to ``iso-host`` is measured in
the same rounds as the bare codec server and the stand-in gateway, and the three figures are reported
side by side, on the terminal and in the results file."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_with_iso_host_reports_bare_stand_in_and_via_host(tmp_path: Path) -> None:
    output = tmp_path / "latest.json"
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--duration", "1", "--rounds", "1", "--connections", "2",
         "--pipeline", "4", "--upstream", "iso-host", "--profile", "iso87-binary", "--output", str(output)],
        cwd=REPO, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    number = r"(\d+) +([\d.]+) +([\d.]+)"
    table = {
        name: re.search(rf"^{re.escape(name)} +{number}", out.stdout, re.M)
        for name in ("bare codec server", "gateway, stand-in", "gateway via iso-host")
    }
    assert all(table.values()), out.stdout
    assert re.search(r"^gateway via iso-host .+ [\d.]+% of bare, [\d.]+% of stand-in$", out.stdout, re.M), out.stdout

    results = json.loads(output.read_text())
    measured = results["profiles"]["iso87-binary"]
    summary = measured["summary"]
    via = measured["rounds"][0]["via_host"]
    # every request the load sent through the gateway was answered, approved by the host, which saw them all
    assert via["errors"] == 0 and via["timeouts"] == 0, via
    assert set(via["response_codes"]) == {"00"} and via["received"] == via["sent"] > 0, via
    assert via["host_received"] >= via["received"], via  # plus the sign-on
    assert summary["via_host_tps_median"] == via["tps"] > 0
    assert summary["ratio_via_host_to_gateway"] == summary["via_host_tps_median"] / summary["gateway_tps_median"]
    assert summary["ratio_via_host_to_bare"] == summary["via_host_tps_median"] / summary["bare_tps_median"]
    assert summary["host_cpu_us_per_msg"] > 0
    printed = {name: int(found.group(1)) for name, found in table.items() if found is not None}
    assert all(value > 0 for value in printed.values()), printed
    assert printed["gateway via iso-host"] == round(summary["via_host_tps_median"]), printed
