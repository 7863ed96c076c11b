"""Business hours: open/closed, holidays, DST in Europe/Berlin, business-time arithmetic."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from routing_rules import Hours
from tests.routing_rules.helpers import load_ruleset

BERLIN_OFFICE = Hours(
    "office",
    "Europe/Berlin",
    {
        0: ((8 * 3600, 18 * 3600),),
        1: ((8 * 3600, 18 * 3600),),
        2: ((8 * 3600, 18 * 3600),),
        3: ((8 * 3600, 18 * 3600),),
        4: ((8 * 3600, 18 * 3600),),
        5: ((10 * 3600, 14 * 3600),),
    },
    frozenset({datetime(2026, 12, 25).date()}),
)
ALWAYS = Hours("always", "Europe/Berlin", {d: ((0, 86400),) for d in range(7)})


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def test_loaded_from_yaml_with_ranges_and_merged_intervals() -> None:
    ruleset = load_ruleset(
        "version: 1\nhours:\n  h:\n    timezone: Europe/Berlin\n"
        '    weekly: {mon-wed: ["08:00-12:00", "11:00-13:00"], sun: ["22:00-24:00"]}\n'
        "queues: {q: {hours: h}}\ndefault: {queue: q}\n"
    )
    hours = ruleset.hours["h"]
    assert hours.weekly == {
        0: ((28800, 46800),),
        1: ((28800, 46800),),
        2: ((28800, 46800),),
        6: ((79200, 86400),),
    }
    assert hours.is_open(utc(2026, 11, 29, 22, 59))  # Sunday 23:59 in Berlin
    assert not hours.is_open(utc(2026, 11, 29, 23, 0))  # Monday 00:00 in Berlin


@pytest.mark.parametrize(
    ("at", "open_"),
    [
        (utc(2026, 11, 25, 7, 0), True),  # Wednesday 08:00 CET, start inclusive
        (utc(2026, 11, 25, 6, 59, 59), False),
        (utc(2026, 11, 25, 17, 0), False),  # 18:00 CET, end exclusive
        (utc(2026, 7, 1, 6, 0), True),  # 08:00 CEST in summer
        (utc(2026, 7, 1, 16, 0), False),  # 18:00 CEST
        (utc(2026, 12, 25, 10, 0), False),  # holiday, a Friday
        (utc(2026, 12, 26, 10, 0), True),  # Saturday 11:00
        (utc(2026, 12, 27, 10, 0), False),  # Sunday
    ],
)
def test_is_open(at: datetime, open_: bool) -> None:
    assert BERLIN_OFFICE.is_open(at) is open_


def test_naive_times_are_rejected() -> None:
    with pytest.raises(ValueError, match="naive"):
        BERLIN_OFFICE.is_open(datetime(2026, 11, 25, 10))


def test_dst_days_are_23_and_25_hours_long() -> None:
    spring = ALWAYS.business_seconds(utc(2026, 3, 28, 23), utc(2026, 3, 29, 22))
    autumn = ALWAYS.business_seconds(utc(2026, 10, 24, 22), utc(2026, 10, 25, 23))
    assert (spring, autumn) == (23 * 3600, 25 * 3600)


def test_interval_starting_in_the_spring_gap_starts_when_clocks_jump() -> None:
    early = Hours("e", "Europe/Berlin", {6: ((2 * 3600 + 1800, 5 * 3600),)})
    assert list(early.periods(utc(2026, 3, 28), utc(2026, 3, 30))) == [
        (utc(2026, 3, 29, 1), utc(2026, 3, 29, 3))
    ]


def test_interval_ending_in_the_autumn_overlap_ends_at_its_later_occurrence() -> None:
    night = Hours("n", "Europe/Berlin", {6: ((0, 2 * 3600 + 1800),)})
    # 00:00 CEST = 22:00 UTC Saturday; the later 02:30 is CET = 01:30 UTC.
    assert list(night.periods(utc(2026, 10, 24), utc(2026, 10, 26))) == [
        (utc(2026, 10, 24, 22), utc(2026, 10, 25, 1, 30))
    ]


def test_add_business_time_across_a_night_and_a_weekend() -> None:
    friday_1730 = utc(2026, 11, 27, 16, 30)  # 17:30 CET
    # 30 min left on Friday, 4 h on Saturday, then Monday 08:00 CET: +1h -> 09:00 CET.
    assert BERLIN_OFFICE.add(friday_1730, timedelta(hours=5, minutes=30)) == utc(2026, 11, 30, 8)


def test_add_business_time_skips_a_holiday() -> None:
    thursday_1700 = utc(2026, 12, 24, 16)  # 17:00 CET, Christmas Eve (a working day here)
    # 1 h left Thursday, Friday 25th is a holiday, Saturday 26th 10:00-14:00 CET.
    assert BERLIN_OFFICE.add(thursday_1700, timedelta(hours=2)) == utc(2026, 12, 26, 10)


def test_business_seconds_across_midnight_and_dst_change() -> None:
    # Saturday 28 March 13:00 CET until Monday 30 March 09:00 CEST: 1 h + 1 h.
    assert BERLIN_OFFICE.business_seconds(utc(2026, 3, 28, 12), utc(2026, 3, 30, 7)) == 7200


def test_next_open() -> None:
    assert BERLIN_OFFICE.next_open(utc(2026, 12, 24, 18)) == utc(2026, 12, 26, 9)
    assert BERLIN_OFFICE.next_open(utc(2026, 11, 25, 10)) == utc(2026, 11, 25, 10)
