"""CoAP numbers have one home (issue 9 §1): `otacoap/core/coap_numbers.py`.

The codes, options and Content-Formats were once defined in four places; a response
code's class and its dotted form are arithmetic on the code byte (RFC 7252 §3: a 3-bit
class, a 5-bit detail) that `coap_numbers.code_class` and `code_str` own. Code that
splits a response code by hand is a second home of that rule.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / "otacoap" / "core" / "coap_numbers.py"
BY_HAND = re.compile(r"\bcode\s*>>\s*5\b|\bcode\s*&\s*(?:31|0x1[fF])\b")


def test_no_code_is_split_by_hand_outside_coap_numbers() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for top in ("otacoap", "device_sim")
        for path in sorted((ROOT / top).rglob("*.py"))
        if path != HOME
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if BY_HAND.search(line)
    ]
    assert offenders == [], "use coap_numbers.code_class / code_str"


def test_the_check_sees_a_split_by_hand() -> None:
    assert BY_HAND.search("if resp.code >> 5 == 4:")
    assert BY_HAND.search('f"{resp.code >> 5}.{resp.code & 31:02d}"')
    assert not BY_HAND.search("if code_class(resp.code) == 4:")
