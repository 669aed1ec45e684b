"""docs/rules.md and the wire profiles stay equal to the rule table in the code."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.core.reasons import ISO87_CODES, RULES, Reason, rules_table
from gateway.protocol.profile import load_profile

DOC = Path(__file__).resolve().parents[2] / "docs" / "rules.md"


def test_docs_rules_md_embeds_the_rule_table_of_the_code() -> None:
    text = DOC.read_text()
    start = text.index("-->\n", text.index("<!-- rules-table")) + 4
    end = text.index("<!-- /rules-table -->")
    assert text[start:end] == rules_table()


def test_every_reason_appears_in_the_rule_table() -> None:
    assert {rule.reason for rule in RULES} | {Reason.APPROVED} == set(Reason)


@pytest.mark.parametrize("profile", ["iso87-binary", "iso87-ascii"])
def test_the_iso87_profiles_answer_every_reason_with_the_documented_code(profile: str) -> None:
    loaded = load_profile(profile)
    assert {reason: loaded.response_code(reason) for reason in ISO87_CODES} == ISO87_CODES
