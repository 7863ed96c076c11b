"""Assignment strategies: the registry the router orders agents by, and the strategies the
rules language accepts."""

from __future__ import annotations

import pytest

from router.assignment.strategies import STRATEGIES, Strategy, TotalUsed
from routing_rules import STRATEGIES as RULE_STRATEGIES


def test_the_registry_implements_exactly_the_strategies_of_the_rules_language() -> None:
    # routing_rules validates `strategy:` and must not import the router: the names are
    # declared there, and every one of them needs an implementation here (and no more)
    assert set(STRATEGIES) == set(RULE_STRATEGIES)
    assert all(name == strategy.name for name, strategy in STRATEGIES.items())


def test_a_strategy_ends_with_the_agent_id_so_its_order_is_total() -> None:
    with pytest.raises(ValueError, match="the last key must be the agent id"):
        Strategy("unfair", (TotalUsed(),))
