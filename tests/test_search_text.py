from __future__ import annotations

import pytest

from query.funnel import SearchQuery, search_text


@pytest.mark.parametrize(
    "text, room, expected",
    [
        ("a cosy space for coffee", "Living Room", "a cosy space for coffee living room"),
        ("a lamp for this bedroom", "Bedroom", "a lamp for this bedroom"),  # already named: not repeated
        ("  a rug ", None, "a rug"),
        (None, "Kitchen", "kitchen"),
        (None, None, None),
        ("a sofa", "  ", "a sofa"),
    ],
)
def test_room_type_is_added_to_the_text_side_once(text, room, expected):
    assert search_text(SearchQuery(text=text, room=room)) == expected
