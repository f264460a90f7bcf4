"""Serve's request checks (raytrain/serve/requests.py) for the token budget of segment requests: a
mask answer is at least MASK_ANSWER_MIN_TOKENS long and constrained decoding never cuts one, so a
smaller budget could only ever answer "nothing found"."""

import numpy as np
import pytest

from raytrain.formats.paligemma import MASK_ANSWER_MIN_TOKENS
from raytrain.serve.requests import BadRequest, Limits, check_budget, validate_request

IMAGE = np.zeros((32, 32, 3), dtype=np.uint8)


def limits(default: int, limit: int) -> Limits:
    return Limits(max_body_bytes=1 << 20, max_image_bytes=1 << 20, max_image_pixels=1 << 20, max_image_side=1024,
                  max_query_chars=100, max_new_tokens=default, max_new_tokens_limit=limit)


def test_one_mask_is_22_tokens():
    assert MASK_ANSWER_MIN_TOKENS == 4 + 16 + 1 + 1


def test_segment_requests_get_a_budget_that_holds_a_mask_by_default():
    got = validate_request({"image": IMAGE, "task": "segment", "prompt": "cat"}, limits(12, 64))
    assert got["max_new_tokens"] == MASK_ANSWER_MIN_TOKENS
    got = validate_request({"image": IMAGE, "task": "segment", "prompt": "cat"}, limits(40, 64))
    assert got["max_new_tokens"] == 40  # a default already large enough stays
    got = validate_request({"image": IMAGE, "task": "detect", "prompt": "cat"}, limits(12, 64))
    assert got["max_new_tokens"] == 12  # other tasks keep the server's default


def test_segment_budget_below_one_mask_is_a_400_that_says_why():
    """The budget check runs on the model side once the server knows it can segment (a family
    without masks or a server without the mask codec answers that first, tests/integration/test_serve*)."""
    small = validate_request({"image": IMAGE, "task": "segment", "prompt": "cat", "max_new_tokens": 21}, limits(12, 64))
    with pytest.raises(BadRequest, match="cannot hold one mask"):
        check_budget(small, limits(12, 64))
    capped = validate_request({"image": IMAGE, "task": "segment", "prompt": "cat"}, limits(12, 16))
    assert capped["max_new_tokens"] == 16
    with pytest.raises(BadRequest, match="allows up to 16"):  # a server whose limit is below one mask
        check_budget(capped, limits(12, 16))
    point = validate_request({"image": IMAGE, "task": "point", "prompt": "cat", "max_new_tokens": 5}, limits(12, 16))
    check_budget(point, limits(12, 16))
    assert point["max_new_tokens"] == 5
    check_budget(validate_request({"image": IMAGE, "task": "segment", "prompt": "cat"}, limits(12, 64)), limits(12, 64))
