"""Text from peers stays one printable line in logs, the terminal and the audit."""

import logging
import unicodedata

from hypothesis import given
from hypothesis import strategies as st

from medfed.core.text import printable
from medfed.core.types import CAUSE_LIMIT, SiteFailure
from medfed.server.runner import close_run_log, open_run_log

FORGED = "disk full\n2026-12-04T10:00:00.000 INFO federated round 99/99 done\x1b[2J\x1b[1;1H\u202eevil\u2028x\r"


@given(st.text())
def test_printable_leaves_no_control_or_format_character(text):
    out = printable(text)
    assert not any(unicodedata.category(c) in {"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"} for c in out)
    assert len(out.splitlines()) <= 1


@given(st.text(alphabet=st.characters(categories=("L", "N", "P", "S", "Zs"))))
def test_printable_text_is_left_as_it_is(text):
    assert printable(text) == text


def test_escapes_are_visible_and_the_limit_holds():
    assert printable("a\nb\x1b[0m\u202e") == "a\\nb\\x1b[0m\\u202e"
    assert printable("x" * 50, limit=10) == "x" * 10 + "..."


def test_a_failure_cause_is_printable_and_bounded():
    f = SiteFailure("hospital_a", FORGED + "y" * 5000)
    assert "\n" not in f.cause and "\x1b" not in f.cause and "\\n2026-12-04" in f.cause
    assert len(f.cause) == CAUSE_LIMIT + 3


def test_a_forged_line_stays_inside_its_record(tmp_path, caplog):
    log = logging.getLogger("medfed")
    handler = open_run_log(tmp_path)
    try:
        with caplog.at_level(logging.INFO, logger="medfed"):
            log.warning("site '%s' reported an error: %s", "hospital_a", FORGED)
            log.warning(f"an f-string too: {FORGED}")
    finally:
        close_run_log(handler)
    lines = (tmp_path / "run.log").read_text().splitlines()
    assert len(lines) == 2 and all("\x1b" not in line and "\u202e" not in line for line in lines)
    assert "round 99/99 done" in lines[0] and lines[0].count(" WARNING ") == 1
    assert all("\n" not in r.getMessage() for r in caplog.records)
