"""A message page is rendered a message at a time (the loop runs between), exactly as the model renders it."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from chatsessions.api.messages import render_page
from chatsessions.models import Message, MessagePage


def message(seq: int, content: object) -> Message:
    at = datetime(2026, 12, 2, 1, 2, 3, 456789, tzinfo=UTC)
    return Message.model_validate({"seq": seq, "role": "assistant", "content": content, "created_at": at})


@pytest.mark.asyncio
@pytest.mark.parametrize("more", [True, False])
async def test_a_rendered_page_is_the_models_json_byte_for_byte(more: bool) -> None:
    pages = [
        [],
        [message(1, "hi")],
        [message(i, 'é\u2028"' * 40_000) for i in range(1, 9)],  # past the yield bound several times
        [message(1, [{"type": "text", "text": "a"}, {"type": "image", "url": "https://x/y.png"}])],
    ]
    for items in pages:
        assert await render_page(items, more) == MessagePage(items=items, has_more=more).model_dump_json().encode()
