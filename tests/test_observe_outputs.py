"""The artefacts of a run: Perfetto trace, picture, HTML page, report text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from vepc.cli import cli
from vepc.scenario import Scenario, run_scenario

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    out = tmp_path_factory.mktemp("story")
    result = CliRunner().invoke(cli, ["run", str(EXAMPLES / "seed_story.toml"), "--trace", str(out / "t.json"),
                                      "--plot", str(out / "p.png"), "--html", str(out / "h.html")])
    assert result.exit_code == 0, result.output
    return out, result.stdout


def test_the_report_is_printed_with_tables_and_a_verdict(story):
    _, text = story
    assert "Steps" in text and "Host EPC by owner after each step" in text and "Enclaves" in text
    assert text.rstrip().splitlines()[-1] == "PASS: 16 steps, invariants hold"
    assert "━" in text                                           # rich tables


def test_the_trace_is_a_chrome_json_trace_with_one_track_per_owner(story):
    out, _ = story
    trace = json.loads((out / "t.json").read_text())
    events = trace["traceEvents"]
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert {"scenario", "host EPC", "host enclaves", "reclaimer (ksgxd)", "VM web", "VM db"} <= names
    for e in events:
        assert {"ph", "pid", "name"} <= set(e)
        if e["ph"] != "M":
            assert isinstance(e["ts"], (int, float)) and e["ts"] >= 0
        if e["ph"] == "X":
            assert e["dur"] > 0
    steps = [e for e in events if e["ph"] == "X" and e["pid"] == 1]
    assert len(steps) == 16 and steps[0]["name"].startswith("1. enclave host-app")
    counters = {e["name"] for e in events if e["ph"] == "C"}
    assert {"free EPC node 0 (MiB)", "free EPC node 1 (MiB)", "web (MiB)", "db (MiB)", "host enclaves (MiB)"} <= counters
    instants = {e["name"] for e in events if e["ph"] == "i"}
    assert {"zombie SECS (child in another section)", "zombie SECS freed", "REMOVE_ALL → 1",
            "system reset (sgx_epc_reset)"} <= instants
    assert any(e["ph"] == "X" and e["name"].startswith("EWB ×") for e in events)


def test_the_picture_is_a_png_of_a_legible_size(story):
    out, _ = story
    data = (out / "p.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image
    with Image.open(out / "p.png") as img:
        assert img.size == (1200, 1050)


def test_the_html_page_is_self_contained(story):
    out, _ = story
    page = (out / "h.html").read_text()
    assert page.count('src="data:image/png;base64,') == 2
    assert "http://" not in page.replace("http://www.w3.org", "") and 'src="http' not in page
    assert "PASS: 16 steps, invariants hold" in page
    assert "<table class=\"events\">" in page and "VEPC_ZOMBIE" in page


def test_report_text_and_verbose_event_totals():
    from vepc.observe.report import report_text

    r = run_scenario(Scenario.from_toml('[host]\nepc = ["4M@0"]\n[[step]]\ndo = "pressure"\nsize = "1M"\n'))
    text = report_text(r.to_dict(), verbose=True)
    assert "Events by kind" in text and "ENCL_ADD" in text and "\x1b[" not in text


def test_piped_output_has_no_progress_bar_and_quiet_prints_nothing(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[host]\nepc = ["4M@0"]\n[[step]]\ndo = "pressure"\nsize = "1M"\n')
    quiet = CliRunner().invoke(cli, ["run", str(path), "--quiet"])
    assert quiet.exit_code == 0 and quiet.stdout == "" and quiet.stderr == ""
    loud = CliRunner().invoke(cli, ["run", str(path)])
    assert "━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━" not in loud.stderr and loud.stderr == ""
