"""The MFA store suite of tests/unit/test_mfa_store.py against a real Redis, and two
replicas (two RedisStore clients) sharing single-use and replay state."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from security.store.redis import RedisStore
from tests.integration.test_redis_store_suite import store  # noqa: F401 - a fresh prefix
from tests.unit.test_mfa_store import (  # noqa: F401 - collected here with a Redis store
    test_advance_only_moves_forward,
    test_concurrent_advances_to_one_value_succeed_once,
    test_concurrent_pops_hand_the_value_to_one_caller,
    test_delete_by_prefix_and_all,
    test_fields_put_get_and_list,
    test_incr_counts_from_zero,
    test_pop_returns_the_value_once,
    test_user_names_with_separators_stay_apart,
)

pytestmark = pytest.mark.integration


async def test_two_replicas_share_replay_and_single_use_state(redis_server):
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    one, two = RedisStore(redis_server.url, prefix=prefix), RedisStore(redis_server.url,
                                                                      prefix=prefix)
    await one.open()
    await two.open()
    try:
        assert await one.mfa_advance("alice", "totp_step", 42)
        assert not await two.mfa_advance("alice", "totp_step", 42)
        await one.mfa_put("alice", "rc:h", "1")
        results = await asyncio.gather(one.mfa_pop("alice", "rc:h"),
                                       two.mfa_pop("alice", "rc:h"))
        assert sorted(results, key=str) == ["1", None]
        assert await two.mfa_users() == ["alice"]
    finally:
        await one.close()
        await two.close()
