"""Seeded synthetic event streams for the transaction-risk loop: transactions, labels and case notes.

Pure Python and deterministic: the same :class:`GeneratorConfig` (seed included) yields the same messages,
byte for byte, in the same order. Nothing here talks to Kafka; :mod:`decisionflow.risk.producer` does, and
:func:`main` (``decisionflow produce``) ties the two together.

What the stream hides (recorded in each :class:`Message`, never in the payload):

* **Fraud patterns** (``Message.pattern``): ``velocity_burst`` (a compromised card used online 5-12 times in
  minutes at different merchants from an attacker device), ``new_device_high_amount`` (one purchase many times
  the account's usual spend from a device never seen on it), ``country_mismatch`` (card-present/ATM use abroad
  shortly after a purchase at home: impossible travel), ``risky_merchant`` (a purchase at a merchant on a hidden
  watch list), ``account_takeover`` (new device and foreign IP, a small test payment, then large transfers with
  tell-tale memos). Attackers reuse a small pool of devices and IPs across accounts.
* **Legit look-alikes** (``Message.decoy``) so that no single rule separates the classes: ``travel``,
  ``new_device``, ``large_purchase``, ``risky_merchant_legit``.
* **Labels arrive later**: chargebacks 2-40 days after the transaction, investigations 1-72 hours after, for
  most fraud and a few (mostly look-alike) legit transactions; only for transactions that were delivered as
  valid records. Investigated transactions get 1-3 case notes whose free text correlates with the pattern.
* **Bad input** (``Message.kind``; ``bad_share`` of all messages on average):
  ``malformed_json``, ``schema_violation`` (``Message.violation`` names the field), ``tombstone`` (null value),
  ``oversized`` (200-900 KiB: under the 1 MiB broker limit, so they are produced and the consumer must cope;
  the bulk is a ``memo``/``text`` beyond its ``maxLength``, so they also fail the contract on that field; at
  most ``oversized_cap`` per run, further draws become other kinds), ``unknown_fields`` (valid plus extra
  fields), ``duplicate`` (an exact re-send of an earlier message, same key and bytes, sent seconds to hours
  later), ``late`` (a valid transaction sent 2-36 hours after its event_time) and ``out_of_order`` (a valid
  transaction held back behind 2-20 later ones). Replacing kinds (malformed, violation, tombstone, oversized)
  stand in for the logical record: it is never delivered intact and gets no label.

Time is simulated from ``GeneratorConfig.start`` (fixed by default, so output does not depend on the clock):
transactions follow a day/night cycle over ``days``; labels and notes are released when simulated time
reaches them, so the stream runs on after the last transaction until every scheduled label has arrived.
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import json
import math
import os
import random
import sys
import time
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from decisionflow.contracts import CASE_NOTES, LABELS, SOURCE_TOPICS, TRANSACTIONS

__all__ = [
    "BAD_KINDS",
    "DECOYS",
    "DEFAULT_BAD_WEIGHTS",
    "EventGenerator",
    "GeneratorConfig",
    "KINDS",
    "Message",
    "PATTERNS",
    "build_parser",
    "default_bootstrap_servers",
    "generate",
    "main",
]

PATTERNS = ("velocity_burst", "new_device_high_amount", "country_mismatch", "risky_merchant", "account_takeover")
DECOYS = ("travel", "new_device", "large_purchase", "risky_merchant_legit")
BAD_KINDS = ("malformed_json", "schema_violation", "tombstone", "oversized", "unknown_fields", "duplicate", "late",
             "out_of_order")
KINDS = ("valid", *BAD_KINDS)
#: Kinds whose payload is not a contract-valid record of the logical event it stands for.
REPLACING_KINDS = frozenset({"malformed_json", "schema_violation", "tombstone", "oversized"})
#: Relative frequency of each bad kind (renormalised over the kinds a topic supports).
DEFAULT_BAD_WEIGHTS: dict[str, float] = {
    "malformed_json": 0.14, "schema_violation": 0.24, "tombstone": 0.08, "oversized": 0.04,
    "unknown_fields": 0.12, "duplicate": 0.14, "late": 0.11, "out_of_order": 0.13,
}
_TOPIC_KINDS = {
    TRANSACTIONS: BAD_KINDS,
    LABELS: ("malformed_json", "schema_violation", "tombstone", "unknown_fields", "duplicate"),
    CASE_NOTES: ("malformed_json", "schema_violation", "tombstone", "oversized", "unknown_fields", "duplicate"),
}
#: Per-trigger probability of starting each fraud scenario (times ``GeneratorConfig.fraud_rate``).
_SCENARIO_RATES = {
    "velocity_burst": 0.0030, "account_takeover": 0.0022, "new_device_high_amount": 0.0050,
    "country_mismatch": 0.0050, "risky_merchant": 0.0050,
}
_DEFAULT_START = datetime(2025, 1, 6, tzinfo=timezone.utc)
_MINUTE, _HOUR, _DAY = 60_000, 3_600_000, 86_400_000
_KIB = 1024

# -- the world: countries, currencies, merchant categories ---------------------------------------------------
# code: (currency, USD->currency rate, decimals, weight as a home country, IPv4 first octets)
_COUNTRIES: dict[str, tuple[str, float, int, float, tuple[int, ...]]] = {
    "US": ("USD", 1.0, 2, 0.30, (23, 34, 52, 64, 98, 173)),
    "GB": ("GBP", 0.79, 2, 0.12, (51, 81, 86, 109)),
    "DE": ("EUR", 0.92, 2, 0.12, (46, 78, 91, 217)),
    "FR": ("EUR", 0.92, 2, 0.08, (37, 82, 90)),
    "NL": ("EUR", 0.92, 2, 0.05, (31, 84, 145)),
    "ES": ("EUR", 0.92, 2, 0.06, (79, 83, 88)),
    "IT": ("EUR", 0.92, 2, 0.05, (2, 79, 93)),
    "PL": ("PLN", 4.0, 2, 0.05, (31, 83, 89)),
    "SE": ("SEK", 10.5, 2, 0.03, (78, 81, 155)),
    "CA": ("CAD", 1.36, 2, 0.06, (24, 70, 99)),
    "AU": ("AUD", 1.52, 2, 0.04, (1, 49, 101)),
    "JP": ("JPY", 150.0, 0, 0.04, (27, 60, 126)),
}
#: Where stolen cards are cashed out and attackers connect from (never a home country here).
_FRAUD_COUNTRIES: dict[str, tuple[str, float, int, float, tuple[int, ...]]] = {
    "NG": ("NGN", 1500.0, 2, 0.0, (102, 105, 197)),
    "RO": ("RON", 4.6, 2, 0.0, (5, 86, 188)),
    "BR": ("BRL", 5.0, 2, 0.0, (177, 179, 189)),
    "MX": ("MXN", 17.0, 2, 0.0, (187, 189, 201)),
    "UA": ("UAH", 41.0, 2, 0.0, (46, 91, 176)),
    "TR": ("TRY", 32.0, 2, 0.0, (78, 88, 176)),
    "PH": ("PHP", 56.0, 2, 0.0, (49, 112, 180)),
}
_ALL_COUNTRIES = {**_COUNTRIES, **_FRAUD_COUNTRIES}
_HOME_CODES = list(_COUNTRIES)
_HOME_WEIGHTS = [_COUNTRIES[c][3] for c in _HOME_CODES]
_FRAUD_CODES = list(_FRAUD_COUNTRIES)

# mcc: (category, weight, spend multiplier, card-present?, online?, watch-list prone?)
_MCCS: dict[str, tuple[str, float, float, bool, bool, bool]] = {
    "5411": ("grocery", 0.18, 1.0, True, True, False),
    "5812": ("restaurant", 0.13, 0.8, True, False, False),
    "5814": ("fast food", 0.08, 0.3, True, True, False),
    "5541": ("fuel", 0.08, 1.0, True, False, False),
    "5999": ("retail", 0.08, 1.0, True, True, False),
    "5311": ("department store", 0.05, 1.5, True, True, False),
    "4121": ("ride hailing", 0.05, 0.6, False, True, False),
    "5912": ("pharmacy", 0.04, 0.6, True, True, False),
    "5732": ("electronics", 0.04, 4.0, True, True, False),
    "4814": ("telecom", 0.03, 1.0, False, True, False),
    "5942": ("books", 0.02, 0.7, True, True, False),
    "4511": ("airline", 0.02, 8.0, False, True, False),
    "7011": ("hotel", 0.02, 5.0, True, True, False),
    "5944": ("jewelry", 0.012, 6.0, True, True, True),
    "7995": ("gambling", 0.010, 2.0, False, True, True),
    "6051": ("crypto exchange", 0.010, 3.0, False, True, True),
    "4829": ("money transfer", 0.012, 3.0, False, True, True),
    "5967": ("direct marketing", 0.008, 1.0, False, True, True),
}
_MCC_CODES = list(_MCCS)
_MCC_WEIGHTS = [_MCCS[m][1] for m in _MCC_CODES]
_ATM_MCC = "6011"
_CHANNELS = ("card_present", "ecommerce", "mobile", "atm")
_CATEGORY = {**{m: v[0] for m, v in _MCCS.items()}, _ATM_MCC: "ATM"}

_LEGIT_MEMOS = {
    "grocery": ["weekly shop", "groceries", "Einkauf", "courses de la semaine", "party supplies"],
    "restaurant": ["dinner", "team lunch", "birthday dinner 🎂", "split bill"],
    "fast food": ["lunch", "coffee ☕", "late snack"],
    "retail": ["Order #{n}", "gift for mum", "home stuff"],
    "department store": ["Order #{n}", "winter coat", "school uniforms"],
    "ride hailing": ["ride home", "airport transfer", "Trip {n}"],
    "pharmacy": ["prescription", "Apotheke"],
    "electronics": ["new headphones", "Order #{n}", "laptop charger"],
    "telecom": ["phone bill", "monthly plan", "top-up"],
    "books": ["books for uni", "Order #{n}"],
    "airline": ["flight to see family", "booking ref {ref}", "holiday flights ✈"],
    "hotel": ["hotel booking {ref}", "conference stay"],
    "jewelry": ["anniversary ring", "watch repair"],
    "gambling": ["weekend bet", "top up account"],
    "crypto exchange": ["DCA buy", "savings"],
    "money transfer": ["rent", "to savings", "pay back Sam", "family support"],
    "direct marketing": ["subscription", "magazine renewal"],
}
_ATO_MEMOS = ["urgent invoice", "crypto top up", "gift cards", "refund to new account", "investment opportunity",
              "pay back loan asap", "safe account transfer", "customs fee"]
_BURST_MEMOS = ["gift card", "digital voucher", "in-game credits", "e-gift", None, None, None]
_UNKNOWN_FIELDS = [
    ("loyalty_tier", lambda r: r.choice(["bronze", "silver", "gold"])),
    ("terminal_id", lambda r: f"T-{r.randrange(10_000, 99_999)}"),
    ("app_version", lambda r: f"{r.randrange(4, 7)}.{r.randrange(0, 20)}.{r.randrange(0, 9)}"),
    ("installments", lambda r: r.choice([1, 3, 6, 12])),
    ("auth_code", lambda r: f"{r.getrandbits(24):06X}"),
    ("three_ds", lambda r: r.choice([True, False])),
    ("geo", lambda r: {"lat": round(r.uniform(-60, 60), 4), "lon": round(r.uniform(-120, 150), 4)}),
]
_INVESTIGATORS = ["inv.a.durand", "inv.k.nowak", "inv.m.okafor", "inv.s.lindqvist", "inv.j.garcia",
                  "inv.h.tanaka", "inv.r.patel", "inv.l.moreau"]


@dataclass(frozen=True)
class GeneratorConfig:
    """
    Everything that determines the output; equal configs give byte-identical streams.

    :param events: transactions to generate (labels, notes and bad input come on top).
    :param seed: the seed; each concern (world, transactions, bad input, labels, text) has its own stream
        derived from it, so e.g. changing ``bad_share`` keeps the same transactions.
    :param bad_share: expected share of all produced messages that are bad input (0..0.5).
    :param topics: topics whose messages are emitted (the others are still simulated, so a transaction
        stream is the same with or without labels).
    :param start: simulated time of the first transaction.
    :param days: simulated span over which the transactions spread (a day/night cycle in UTC).
    :param accounts: number of accounts; default ``max(50, events // 20)``.
    :param merchants: number of merchants; default ``max(60, min(20000, events // 60))``.
    :param fraud_rate: multiplier on the fraud scenario rates (1.0: roughly 4-5% of transactions are fraud).
    :param bad_weights: relative frequency of each bad kind (see :data:`DEFAULT_BAD_WEIGHTS`).
    :param oversized_cap: at most this many oversized messages per run (each is 200-900 KiB).
    :param fraud_label_share: share of (validly delivered) fraud transactions that ever get a label.
    :param investigation_share: share of labelled fraud found by investigation (hours) rather than chargeback (days).
    :param decoy_review_share: share of legit look-alikes reviewed (labelled legit, with case notes).
    :param legit_review_share: share of other legit transactions reviewed.
    """

    events: int = 10_000
    seed: int = 0
    bad_share: float = 0.05
    topics: tuple[str, ...] = SOURCE_TOPICS
    start: datetime = _DEFAULT_START
    days: float = 14.0
    accounts: int | None = None
    merchants: int | None = None
    fraud_rate: float = 1.0
    bad_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_BAD_WEIGHTS))
    oversized_cap: int = 50
    fraud_label_share: float = 0.9
    investigation_share: float = 0.4
    decoy_review_share: float = 0.3
    legit_review_share: float = 0.02

    def __post_init__(self):
        if self.events < 1:
            raise ValueError(f"events must be >= 1, got {self.events}")
        if not 0 <= self.bad_share <= 0.5:
            raise ValueError(f"bad_share must be within [0, 0.5], got {self.bad_share}")
        if self.days <= 0:
            raise ValueError(f"days must be > 0, got {self.days}")
        unknown = [t for t in self.topics if t not in SOURCE_TOPICS]
        if unknown or not self.topics:
            raise ValueError(f"topics must be a non-empty subset of {list(SOURCE_TOPICS)}, got {list(self.topics)}")
        bad = [k for k in self.bad_weights if k not in BAD_KINDS]
        if bad or any(w < 0 for w in self.bad_weights.values()):
            raise ValueError(f"bad_weights: unknown kinds {bad} or negative weights; kinds are {list(BAD_KINDS)}")
        if self.start.tzinfo is None:
            raise ValueError("start must be timezone-aware (UTC)")

    @property
    def n_accounts(self) -> int:
        return self.accounts or max(50, self.events // 20)

    @property
    def n_merchants(self) -> int:
        return self.merchants or max(60, min(20_000, self.events // 60))


@dataclass(slots=True)
class Message:
    """
    One Kafka message to produce, with its hidden truth.

    ``key``/``value`` are the exact bytes (``value is None`` is a tombstone). ``event_id`` is the logical
    record the message carries or stands for (for replacing kinds it may not be readable from the payload);
    ``record_time`` its event_time/labelled_at/created_at; ``sent_at`` the simulated time it is sent.
    ``is_fraud``/``pattern``/``decoy`` describe the underlying transaction on every topic.
    """

    seq: int
    topic: str
    key: bytes | None
    value: bytes | None
    kind: str
    event_id: str | None
    record_time: str | None
    sent_at: str
    is_fraud: bool | None
    pattern: str | None
    decoy: str | None
    contract_valid: bool
    violation: str | None = None
    duplicate_of: int | None = None
    _original: Any = None  # the Message a duplicate re-sends (its seq is known once it was emitted)

    def truth(self) -> dict[str, Any]:
        """The ground-truth row of this message (the producer adds partition, offset and sizes)."""
        return {
            "seq": self.seq, "topic": self.topic, "key": self.key.decode() if self.key is not None else None,
            "kind": self.kind, "contract_valid": self.contract_valid, "violation": self.violation,
            "event_id": self.event_id, "record_time": self.record_time, "sent_at": self.sent_at,
            "is_fraud": self.is_fraud, "pattern": self.pattern, "decoy": self.decoy,
            "duplicate_of": self.duplicate_of,
        }


# -- helpers ------------------------------------------------------------------------------------------------
_ISO_SECOND: list = [None, ""]


def _iso(ms: int) -> str:
    """RFC 3339 UTC with milliseconds: ``2025-01-06T10:00:00.123Z``."""
    second = ms // 1000
    if _ISO_SECOND[0] != second:  # consecutive calls mostly fall in the same or a nearby second
        _ISO_SECOND[0], _ISO_SECOND[1] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_ISO_SECOND[1]}.{ms % 1000:03d}Z"


def _dumps(record: dict) -> bytes:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()


def _uuid(rng: random.Random) -> str:
    """A version-4 UUID drawn from ``rng`` (same as ``str(uuid.UUID(int=bits, version=4))``, faster)."""
    bits = (rng.getrandbits(128) & ~(0xF000 << 64) & ~(0xC000 << 48)) | (0x4000 << 64) | (0x8000 << 48)
    h = f"{bits:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _diurnal(ms: int) -> float:
    """Relative activity by UTC hour: quiet at night, a peak in the afternoon."""
    hour = (ms // _HOUR) % 24 + ((ms % _HOUR) / _HOUR)
    return 0.15 + 0.85 * max(0.0, math.sin(math.pi * (hour - 6.0) / 18.0)) if 6 <= hour else 0.15


_DIURNAL_MEAN = sum(_diurnal(int(h * _HOUR / 4)) for h in range(96)) / 96


class _Account:
    __slots__ = ("id", "home", "currency", "scale", "channels", "devices", "ips", "favourites", "last_ms",
                 "last_country", "trip")

    def __init__(self, **kw):
        for key, value in kw.items():
            setattr(self, key, value)


class _Merchant:
    __slots__ = ("id", "country", "mcc", "risky")

    def __init__(self, id, country, mcc, risky):  # noqa: A002 - a merchant's id
        self.id, self.country, self.mcc, self.risky = id, country, mcc, risky


class _Txn:
    __slots__ = ("record", "ms", "account", "is_fraud", "pattern", "decoy", "detail", "index")

    def __init__(self, record, ms, account, is_fraud, pattern, decoy, detail):
        self.record, self.ms, self.account = record, ms, account
        self.is_fraud, self.pattern, self.decoy, self.detail = is_fraud, pattern, decoy, detail
        self.index = -1


class _World:
    """Accounts, merchants and attacker infrastructure, drawn once from the seed."""

    def __init__(self, config: GeneratorConfig, rng: random.Random):
        self.rng = rng
        n_merchants = config.n_merchants
        self.merchants: list[_Merchant] = []
        self.cp_by_country: dict[str, list[_Merchant]] = {c: [] for c in _ALL_COUNTRIES}
        self.online: list[_Merchant] = []
        self.online_home: dict[str, list[_Merchant]] = {c: [] for c in _ALL_COUNTRIES}
        for i in range(n_merchants):
            country = (rng.choices(_HOME_CODES, _HOME_WEIGHTS)[0] if rng.random() < 0.93
                       else rng.choice(_FRAUD_CODES))
            mcc = rng.choices(_MCC_CODES, _MCC_WEIGHTS)[0]
            prone = _MCCS[mcc][5]
            risky = rng.random() < (0.30 if prone else 0.02)
            self._add(_Merchant(f"mer-{i:05d}", country, mcc, risky))
        # Every country has somewhere to pay in person and an ATM; the watch list is never empty.
        for country in _ALL_COUNTRIES:
            if not self.cp_by_country[country]:
                self._add(_Merchant(f"mer-{len(self.merchants):05d}", country, "5411", False))
            for j in range(2):
                self._add(_Merchant(f"atm-{country.lower()}-{j}", country, _ATM_MCC, False))
        self.risky_online = [m for m in self.online if m.risky]
        while len(self.risky_online) < 3:
            mcc = rng.choice([m for m in _MCC_CODES if _MCCS[m][5]])
            merchant = _Merchant(f"mer-{len(self.merchants):05d}", rng.choice(_FRAUD_CODES), mcc, True)
            self._add(merchant)
            self.risky_online.append(merchant)
        self.atms = {c: [m for m in self.cp_by_country[c] if m.mcc == _ATM_MCC] for c in _ALL_COUNTRIES}
        self.cp_shops = {c: [m for m in self.cp_by_country[c] if m.mcc != _ATM_MCC] for c in _ALL_COUNTRIES}
        self.high_value_online = [m for m in self.online if m.mcc in ("5732", "5944", "4511", "7011", "5311")]
        self.transfer_online = [m for m in self.online if m.mcc in ("4829", "6051")] or self.online
        self.digital_online = [m for m in self.online if m.mcc in ("5999", "4814", "5967", "7995", "5732")] \
            or self.online

        # Attacker infrastructure, reused across victims.
        self.attacker_devices = [f"dev-{rng.getrandbits(64):016x}" for _ in range(24)]
        self.attacker_ips = [(c, self.ip(c)) for c in (rng.choice(_FRAUD_CODES) for _ in range(30))]

        self.accounts: list[_Account] = []
        for i in range(config.n_accounts):
            home = rng.choices(_HOME_CODES, _HOME_WEIGHTS)[0]
            cp = rng.uniform(0.3, 0.65)
            online = rng.uniform(0.15, 0.4)
            mobile = rng.uniform(0.05, 0.3)
            atm = rng.uniform(0.0, 0.08)
            shops = self.cp_shops[home]
            favourites = [rng.choice(shops) for _ in range(min(8, len(shops)))]
            self.accounts.append(_Account(
                id=f"acc-{i:06d}", home=home, currency=_COUNTRIES[home][0],
                scale=math.exp(rng.gauss(math.log(40.0), 0.55)),
                channels=[cp, cp + online, cp + online + mobile, cp + online + mobile + atm],  # cumulative
                devices=[f"dev-{rng.getrandbits(64):016x}" for _ in range(rng.choice((1, 1, 2, 2, 3)))],
                ips=[self.ip(home) for _ in range(rng.choice((1, 2, 2, 3)))],
                favourites=favourites, last_ms=None, last_country=home, trip=None,
            ))
        self.activity = [math.exp(rng.gauss(0.0, 0.8)) for _ in self.accounts]
        self._cum_activity = []
        total = 0.0
        for weight in self.activity:
            total += weight
            self._cum_activity.append(total)

    def _add(self, merchant: _Merchant) -> None:
        self.merchants.append(merchant)
        if merchant.mcc == _ATM_MCC or _MCCS[merchant.mcc][3]:
            self.cp_by_country[merchant.country].append(merchant)
        if merchant.mcc != _ATM_MCC and _MCCS[merchant.mcc][4]:
            self.online.append(merchant)
            self.online_home[merchant.country].append(merchant)

    def ip(self, country: str) -> str:
        rng = self.rng
        if rng.random() < 0.1:
            return "2a0{}:{:x}:{:x}::{:x}".format(rng.randrange(1, 10), rng.getrandbits(16), rng.getrandbits(16),
                                                  rng.getrandbits(16) or 1)
        first = rng.choice(_ALL_COUNTRIES[country][4])
        return f"{first}.{rng.randrange(0, 256)}.{rng.randrange(0, 256)}.{rng.randrange(1, 255)}"

    def pick_account(self, rng: random.Random) -> _Account:
        x = rng.random() * self._cum_activity[-1]
        return self.accounts[min(bisect.bisect_right(self._cum_activity, x), len(self.accounts) - 1)]


def _amount(usd: float, currency_country: str) -> float | int:
    _currency, fx, decimals, _w, _ips = _ALL_COUNTRIES[currency_country]
    usd = min(max(usd, 0.5), 20_000.0)
    local = min(usd * fx, 999_000.0)
    if decimals == 0:
        return max(1, int(round(local)))
    return round(max(local, 0.01), 2)


# -- the generator ------------------------------------------------------------------------------------------
class EventGenerator:
    """
    Iterate the messages of one run: ``for message in EventGenerator(config): ...``.

    After (or during) iteration, :attr:`transactions_done` counts transactions generated so far (for a
    progress bar) and :attr:`counts` the messages emitted per ``(topic, kind)``.
    """

    def __init__(self, config: GeneratorConfig):
        self.config = config
        self._start_ms = int(config.start.timestamp() * 1000)
        weights = {k: max(0.0, config.bad_weights.get(k, 0.0)) for k in BAD_KINDS}
        self._kinds: dict[str, tuple[list[str], list[float], float]] = {}
        for topic, allowed in _TOPIC_KINDS.items():
            kinds = [k for k in allowed if weights[k] > 0]
            total = sum(weights[k] for k in kinds)
            probs = [weights[k] / total for k in kinds] if total else []
            dup = (weights["duplicate"] / total) if total and "duplicate" in kinds else 0.0
            # A duplicate adds a message, the other kinds replace one: solve bad/(all) = bad_share.
            share = config.bad_share
            p_bad = min(1.0, share / (1.0 - share * dup)) if kinds else 0.0
            self._kinds[topic] = (kinds, probs, p_bad)
        self._reset()

    def _reset(self) -> None:
        seed = self.config.seed
        self._rng_world = random.Random(f"{seed}:world")
        self._rng = random.Random(f"{seed}:transactions")
        self._rng_bad = random.Random(f"{seed}:bad-input")
        self._rng_label = random.Random(f"{seed}:labels")
        self._rng_text = random.Random(f"{seed}:text")
        self.transactions_done = 0
        self.counts: dict[tuple[str, str], int] = {}
        self._oversized = 0
        self._cases = 0

    # -- public -------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Message]:
        """Each iteration starts over from the seed, so iterating twice gives the same messages."""
        self._reset()
        wanted = set(self.config.topics)
        seq = 0
        for message in self._stream():
            if message.topic not in wanted:
                continue
            message.seq = seq
            if message._original is not None:
                message.duplicate_of = message._original.seq
                message._original = None
            seq += 1
            key = (message.topic, message.kind)
            self.counts[key] = self.counts.get(key, 0) + 1
            yield message

    # -- the merged timeline ------------------------------------------------------------------------------
    def _stream(self) -> Iterator[Message]:
        self._pending: list = []  # (release_ms, tiebreak, Message)
        self._tie = 0
        self._held: list[list] = []  # [remaining transactions, Message] for out_of_order
        n = self.config.events
        for txn in self._transactions():
            clock = txn.ms
            while self._pending and self._pending[0][0] <= clock:
                yield heapq.heappop(self._pending)[2]
            yield from self._emit_transaction(txn, clock, near_end=txn.index >= n - 30)
            if self._held:
                still = []
                for item in self._held:
                    item[0] -= 1
                    if item[0] <= 0:
                        yield item[1]
                    else:
                        still.append(item)
                self._held = still
        for _, message in self._held:
            yield message
        while self._pending:
            yield heapq.heappop(self._pending)[2]

    def _schedule(self, release_ms: int, message: Message) -> None:
        self._tie += 1
        heapq.heappush(self._pending, (release_ms, self._tie, message))

    # -- transactions -------------------------------------------------------------------------------------
    def _transactions(self) -> Iterator[_Txn]:
        config, rng = self.config, self._rng
        world = self.world = _World(config, self._rng_world)
        self._recent: deque[_Account] = deque(maxlen=256)
        per_trigger = 1.0 + config.fraud_rate * (_SCENARIO_RATES["velocity_burst"] * 7.5
                                                 + _SCENARIO_RATES["account_takeover"] * 3.5)
        rate_avg = config.events / per_trigger / (config.days * _DAY)  # triggers per ms
        rate_max = rate_avg / _DIURNAL_MEAN
        scenarios = list(_SCENARIO_RATES)
        thresholds = []
        acc = 0.0
        for name in scenarios:
            acc += _SCENARIO_RATES[name] * config.fraud_rate
            thresholds.append(acc)

        future: list = []  # (ms, tiebreak, callable) events already decided by a running scenario
        tie = 0
        next_trigger = self._start_ms
        produced = 0
        while produced < config.events:
            if future and future[0][0] <= next_trigger:
                ms, _, make = heapq.heappop(future)
                txn = make(ms)
            else:
                ms = next_trigger
                while True:  # thinning: a Poisson process modulated by the time of day
                    next_trigger += max(1, int(rng.expovariate(rate_max)))
                    if rng.random() <= _diurnal(next_trigger):
                        break
                roll = rng.random()
                scenario = next((s for s, t in zip(scenarios, thresholds) if roll < t), None)
                if scenario is None:
                    txn = self._legit(ms)
                else:
                    txn, follow_ups = getattr(self, f"_fraud_{scenario}")(ms)
                    for at, make in follow_ups:
                        tie += 1
                        heapq.heappush(future, (at, tie, make))
            txn.index = produced
            produced += 1
            self.transactions_done = produced
            account = txn.account
            account.last_ms, account.last_country = ms, txn.record["country"]
            self._recent.append(account)
            yield txn

    def _record(self, ms, account, merchant, amount, currency, channel, country, device, ip, memo) -> dict:
        return {
            "event_id": _uuid(self._rng), "event_time": _iso(ms), "account_id": account.id,
            "merchant_id": merchant.id, "amount": amount, "currency": currency, "mcc": merchant.mcc,
            "channel": channel, "country": country, "device_id": device, "ip": ip, "memo": memo,
            "schema_version": 1,
        }

    def _memo(self, category: str, chance: float) -> str | None:
        rng = self._rng
        if rng.random() >= chance:
            return None
        template = rng.choice(_LEGIT_MEMOS.get(category, ["payment"]))
        return template.format(n=rng.randrange(10_000, 999_999), ref=f"{rng.getrandbits(24):06X}")

    def _legit(self, ms: int) -> _Txn:
        rng, world = self._rng, self.world
        account = world.pick_account(rng)
        decoy = None
        if account.trip and account.trip[1] < ms:
            account.trip = None
        if account.trip is None and rng.random() < 0.004:
            account.trip = (rng.choice([c for c in _HOME_CODES if c != account.home]),
                            ms + rng.randrange(2 * _DAY, 10 * _DAY))
        where = account.trip[0] if account.trip else account.home
        channel = rng.choices(_CHANNELS, cum_weights=account.channels)[0]
        device = ip = None
        if channel in ("card_present", "atm"):
            if channel == "atm":
                merchant = rng.choice(world.atms[where])
                usd = rng.choice((20, 40, 50, 60, 100, 150, 200, 300)) * (1.0 + (account.scale > 60))
            else:
                pool = world.cp_shops[where]
                merchant = rng.choice(account.favourites) if where == account.home and rng.random() < 0.7 \
                    else rng.choice(pool)
                usd = rng.lognormvariate(math.log(account.scale * _MCCS[merchant.mcc][2]), 0.6)
            country = merchant.country
            if account.trip:
                decoy = "travel"
        else:
            if rng.random() < 0.006 and world.risky_online:
                merchant = rng.choice(world.risky_online)
                decoy = "risky_merchant_legit"
            elif rng.random() < 0.85 and world.online_home[account.home]:
                merchant = rng.choice(world.online_home[account.home])
            else:
                merchant = rng.choice(world.online)
            usd = rng.lognormvariate(math.log(account.scale * _MCCS[merchant.mcc][2]), 0.7)
            country = merchant.country
            if rng.random() < 0.02:  # a new phone or laptop, legitimately
                device = f"dev-{rng.getrandbits(64):016x}"
                account.devices.append(device)
                decoy = decoy or "new_device"
            else:
                device = rng.choice(account.devices)
            ip = world.ip(where) if account.trip else rng.choice(account.ips)
        if decoy is None and rng.random() < 0.01:
            usd *= rng.uniform(8.0, 15.0)
            decoy = "large_purchase"
        currency_country = country if channel in ("card_present", "atm") else account.home
        memo = None if channel in ("card_present", "atm") else self._memo(_CATEGORY[merchant.mcc], 0.3)
        record = self._record(ms, account, merchant, _amount(usd, currency_country),
                              _ALL_COUNTRIES[currency_country][0], channel, country, device, ip, memo)
        return _Txn(record, ms, account, False, None, decoy, {})

    # Fraud scenarios return the first transaction and [(ms, make(ms) -> _Txn), ...] for the rest.
    def _fraud_velocity_burst(self, ms: int):
        rng, world = self._rng, self.world
        account = world.pick_account(rng)
        size = rng.randrange(5, 13)
        device = rng.choice(world.attacker_devices)
        ip_country, ip = rng.choice(world.attacker_ips)
        offsets = [0]
        for _ in range(size - 1):
            offsets.append(offsets[-1] + rng.randrange(8_000, 90_000))
        detail = {"n": size, "mins": max(1, round(offsets[-1] / _MINUTE)), "device": device, "ip": ip,
                  "ip_country": ip_country}

        def make(at: int) -> _Txn:
            merchant = rng.choice(world.digital_online)
            usd = rng.uniform(3.0, 40.0) if rng.random() < 0.4 else rng.uniform(40.0, 250.0)
            record = self._record(at, account, merchant, _amount(usd, account.home), account.currency,
                                  "ecommerce", merchant.country, device, ip, rng.choice(_BURST_MEMOS))
            return _Txn(record, at, account, True, "velocity_burst", None, detail)

        return make(ms), [(ms + off, make) for off in offsets[1:]]

    def _fraud_account_takeover(self, ms: int):
        rng, world = self._rng, self.world
        account = world.pick_account(rng)
        device = rng.choice(world.attacker_devices)
        ip_country, ip = rng.choice(world.attacker_ips)
        transfers = rng.randrange(2, 5)
        detail = {"device": device, "ip": ip, "ip_country": ip_country, "transfers": transfers,
                  "memo": rng.choice(_ATO_MEMOS)}

        def test_payment(at: int) -> _Txn:
            merchant = rng.choice(world.digital_online)
            record = self._record(at, account, merchant, _amount(rng.uniform(0.5, 4.0), account.home),
                                  account.currency, "mobile", merchant.country, device, ip, None)
            return _Txn(record, at, account, True, "account_takeover", None, detail)

        def transfer(at: int) -> _Txn:
            merchant = rng.choice(world.transfer_online)
            usd = rng.uniform(400.0, 4000.0) * (1.0 + account.scale / 100.0)
            memo = detail["memo"] if rng.random() < 0.7 else rng.choice(_ATO_MEMOS)
            record = self._record(at, account, merchant, _amount(usd, account.home), account.currency, "mobile",
                                  merchant.country, device, ip, memo)
            return _Txn(record, at, account, True, "account_takeover", None, detail)

        follow, at = [], ms
        for _ in range(transfers):
            at += rng.randrange(3 * _MINUTE, 30 * _MINUTE)
            follow.append((at, transfer))
        return test_payment(ms), follow

    def _fraud_new_device_high_amount(self, ms: int):
        rng, world = self._rng, self.world
        account = world.pick_account(rng)
        device = f"dev-{rng.getrandbits(64):016x}"
        ratio = rng.uniform(8.0, 25.0)
        merchant = rng.choice(world.high_value_online or world.online)
        channel = rng.choice(("ecommerce", "mobile"))
        if rng.random() < 0.5:
            ip = world.ip(account.home)  # a proxy in the victim's country
        else:
            ip = rng.choice(world.attacker_ips)[1]
        usd = account.scale * _MCCS[merchant.mcc][2] * ratio / 2.0 + account.scale * ratio
        record = self._record(ms, account, merchant, _amount(usd, account.home), account.currency, channel,
                              merchant.country, device, ip, self._memo(_CATEGORY[merchant.mcc], 0.15))
        detail = {"device": device, "ratio": round(ratio), "channel": channel}
        return _Txn(record, ms, account, True, "new_device_high_amount", None, detail), []

    def _fraud_country_mismatch(self, ms: int):
        rng, world = self._rng, self.world
        recent = [a for a in self._recent if a.last_ms and ms - a.last_ms < 12 * _HOUR and a.trip is None]
        account = rng.choice(recent) if recent else world.pick_account(rng)
        country = rng.choice(_FRAUD_CODES)
        if rng.random() < 0.5:
            channel, merchant = "atm", rng.choice(world.atms[country])
            usd = rng.choice((200, 300, 400, 500, 600))
        else:
            channel, merchant = "card_present", rng.choice(world.cp_shops[country])
            usd = rng.uniform(150.0, 1500.0)
        gap = ms - account.last_ms if account.last_ms else None
        record = self._record(ms, account, merchant, _amount(usd, country), _ALL_COUNTRIES[country][0], channel,
                              country, None, None, None)
        detail = {"country": country, "home": account.home, "gap_min": round(gap / _MINUTE) if gap else None,
                  "channel": channel}
        return _Txn(record, ms, account, True, "country_mismatch", None, detail), []

    def _fraud_risky_merchant(self, ms: int):
        rng, world = self._rng, self.world
        account = world.pick_account(rng)
        merchant = rng.choice(world.risky_online)
        device = rng.choice(account.devices) if rng.random() < 0.5 else rng.choice(world.attacker_devices)
        ip = rng.choice(account.ips) if rng.random() < 0.5 else rng.choice(world.attacker_ips)[1]
        usd = rng.lognormvariate(math.log(120.0 * _MCCS[merchant.mcc][2]), 0.6)
        record = self._record(ms, account, merchant, _amount(usd, account.home), account.currency, "ecommerce",
                              merchant.country, device, ip, self._memo(_CATEGORY[merchant.mcc], 0.2))
        detail = {"merchant": merchant.id, "category": _CATEGORY[merchant.mcc]}
        return _Txn(record, ms, account, True, "risky_merchant", None, detail), []

    # -- emitting with bad input --------------------------------------------------------------------------
    def _kind(self, topic: str, near_end: bool = False) -> str:
        rng = self._rng_bad
        kinds, probs, p_bad = self._kinds[topic]
        if not kinds or rng.random() >= p_bad:
            return "valid"
        kind = rng.choices(kinds, probs)[0]
        if kind == "oversized" and self._oversized >= self.config.oversized_cap:
            others = [(k, p) for k, p in zip(kinds, probs) if k != "oversized"]
            kind = rng.choices([k for k, _ in others], [p for _, p in others])[0] if others else "valid"
        if near_end and kind in ("late", "out_of_order"):
            kind = "unknown_fields"  # too close to the end to be overtaken reliably
        if kind == "oversized":
            self._oversized += 1
        return kind

    def _message(self, topic, key, value, kind, txn: _Txn, record_time, sent_ms, *, valid,
                 violation=None) -> Message:
        return Message(seq=-1, topic=topic, key=key, value=value, kind=kind, event_id=txn.record["event_id"],
                       record_time=record_time, sent_at=_iso(sent_ms),
                       is_fraud=txn.is_fraud, pattern=txn.pattern, decoy=txn.decoy, contract_valid=valid,
                       violation=violation)

    def _encode(self, topic: str, record: dict, kind: str) -> tuple[bytes | None, bool, str | None]:
        """Payload for ``kind``: (value, contract-valid?, violated field or problem)."""
        rng = self._rng_bad
        if kind == "tombstone":
            return None, False, "null"
        if kind == "malformed_json":
            return _malformed(rng, record), False, "json"
        if kind == "schema_violation":
            broken, name = _violate(rng, topic, record)
            return _dumps(broken), False, name
        if kind == "oversized":
            name = "memo" if topic == TRANSACTIONS else "text"
            size = rng.randrange(200 * _KIB, 900 * _KIB)
            phrase = "lorem ipsum dolor sit amet consectetur "  # ASCII, so characters == bytes
            big = dict(record)
            big[name] = (phrase * (size // len(phrase) + 1))[:size]
            return _dumps(big), False, name
        if kind == "unknown_fields":
            extra = dict(record)
            for name, make in rng.sample(_UNKNOWN_FIELDS, rng.randrange(1, 4)):
                extra[name] = make(rng)
            return _dumps(extra), True, None
        return _dumps(record), True, None

    def _emit(self, topic: str, record: dict, key: bytes, txn: _Txn, record_time: str, sent_ms: int,
              kind: str) -> tuple[Message, bool]:
        """Encode one logical record as ``kind``; schedules a duplicate re-send. Returns (message, delivered?)."""
        value, valid, violation = self._encode(topic, record, kind)
        message = self._message(topic, key, value, kind if kind != "duplicate" else "valid", txn, record_time,
                                sent_ms, valid=valid, violation=violation)
        if kind == "duplicate":
            resend_ms = sent_ms + self._rng_bad.randrange(1_000, 2 * _HOUR)
            copy = replace(message, kind="duplicate", sent_at=_iso(resend_ms), _original=message)
            self._schedule(resend_ms, copy)
        return message, kind not in REPLACING_KINDS

    def _emit_transaction(self, txn: _Txn, clock: int, near_end: bool) -> Iterator[Message]:
        kind = self._kind(TRANSACTIONS, near_end)
        record = txn.record
        key = txn.account.id.encode()
        sent_ms = clock
        if kind == "late":
            sent_ms = clock + self._rng_bad.randrange(2 * _HOUR, 36 * _HOUR)
        message, delivered = self._emit(TRANSACTIONS, record, key, txn, record["event_time"], sent_ms, kind)
        if kind == "late":
            self._schedule(sent_ms, message)
        elif kind == "out_of_order":
            self._held.append([self._rng_bad.randrange(2, 21), message])
        else:
            yield message
        if delivered:
            self._plan_outcome(txn, sent_ms)

    # -- labels and case notes ----------------------------------------------------------------------------
    def _plan_outcome(self, txn: _Txn, delivered_ms: int) -> None:
        rng, config = self._rng_label, self.config
        if txn.is_fraud:
            if rng.random() >= config.fraud_label_share:
                return
            investigated = rng.random() < config.investigation_share
        else:
            share = config.decoy_review_share if txn.decoy else config.legit_review_share
            if rng.random() >= share:
                return
            investigated = True
        base = max(txn.ms, delivered_ms)
        if investigated:
            labelled_ms = base + rng.randrange(1 * _HOUR, 72 * _HOUR)
        else:
            labelled_ms = base + int(_DAY * min(40.0, 2.0 + rng.expovariate(1 / 9.0)))
        label = {"event_id": txn.record["event_id"], "label": "fraud" if txn.is_fraud else "legit",
                 "source": "investigation" if investigated else "chargeback", "labelled_at": _iso(labelled_ms),
                 "schema_version": 1}
        key = txn.account.id.encode()
        kind = self._kind(LABELS)
        message, _ = self._emit(LABELS, label, key, txn, label["labelled_at"], labelled_ms, kind)
        self._schedule(labelled_ms, message)
        if investigated:
            self._plan_notes(txn, base, labelled_ms)

    def _plan_notes(self, txn: _Txn, opened_ms: int, closed_ms: int) -> None:
        rng = self._rng_text
        self._cases += 1
        case_id = f"CASE-{self._cases:07d}"
        author = rng.choice(_INVESTIGATORS)
        texts = _case_texts(rng, txn)
        span = closed_ms - opened_ms
        times = sorted(opened_ms + int(span * rng.uniform(0.05, 0.9)) for _ in texts[:-1])
        times.append(closed_ms - rng.randrange(1_000, min(10 * _MINUTE, max(2_000, span // 10))))
        key = txn.account.id.encode()
        for at, text in zip(times, texts):
            note = {"case_id": case_id, "event_id": txn.record["event_id"], "account_id": txn.account.id,
                    "author": author if rng.random() < 0.85 else rng.choice(_INVESTIGATORS), "text": text,
                    "created_at": _iso(at), "schema_version": 1}
            kind = self._kind(CASE_NOTES)
            message, _ = self._emit(CASE_NOTES, note, key, txn, note["created_at"], at, kind)
            self._schedule(at, message)


# -- bad payloads -------------------------------------------------------------------------------------------
def _malformed(rng: random.Random, record: dict) -> bytes:
    text = _dumps(record)
    variant = rng.randrange(5)
    if variant == 0:  # truncated mid-way (a cut-off write): an object prefix is never valid JSON
        return text[: rng.randrange(1, len(text) - 1)]
    if variant == 1:  # a Python repr instead of JSON
        return repr(record).encode()
    if variant == 2:  # two records glued together
        return text + text
    if variant == 3:  # not UTF-8 at all
        return b"\xc3\x28" + text[:40] + bytes(rng.getrandbits(8) | 0x80 for _ in range(8))
    return b"<txn " + text[:60].replace(b'"', b"'") + b"/>"  # the wrong format entirely


_TXN_VIOLATIONS = [
    ("amount", lambda r, v: -round(abs(v) or 1.0, 2)), ("amount", lambda r, v: 0),
    ("amount", lambda r, v: str(v)), ("amount", lambda r, v: 2_500_000.0), ("amount", lambda r, v: None),
    ("currency", lambda r, v: v.lower()), ("currency", lambda r, v: v[:2]), ("currency", lambda r, v: v + "O"),
    ("mcc", lambda r, v: int(v)), ("mcc", lambda r, v: v[:3]), ("mcc", lambda r, v: v[:2] + "A" + v[3:]),
    ("channel", lambda r, v: r.choice(["pos", "web", "CARD_PRESENT", "branch"])),
    ("country", lambda r, v: v.lower()), ("country", lambda r, v: v + "X"), ("country", lambda r, v: ""),
    ("event_time", lambda r, v: v.replace("T", " ").rstrip("Z")), ("event_time", lambda r, v: v[:19] + "+01:00"),
    ("event_time", lambda r, v: 1_736_000_000_000), ("event_time", lambda r, v: v[:5] + "02-30" + v[10:]),
    ("event_id", lambda r, v: v[:8]), ("event_id", lambda r, v: "txn-" + v[:13]),
    ("ip", lambda r, v: f"{r.randrange(256, 999)}.1.1.1"), ("ip", lambda r, v: "localhost"),
    ("schema_version", lambda r, v: "1"), ("schema_version", lambda r, v: 7),
    ("merchant_id", lambda r, v: ""), ("device_id", lambda r, v: ""),
]
_LABEL_VIOLATIONS = [
    ("label", lambda r, v: r.choice(["FRAUD", "maybe", "unknown", "chargeback"])), ("label", lambda r, v: None),
    ("source", lambda r, v: r.choice(["customer", "model", "CHARGEBACK"])),
    ("labelled_at", lambda r, v: v[:10]), ("labelled_at", lambda r, v: v.replace("Z", "")),
    ("event_id", lambda r, v: v.replace("-", "")), ("schema_version", lambda r, v: 1.5),
]
_NOTE_VIOLATIONS = [
    ("text", lambda r, v: ""), ("text", lambda r, v: None), ("author", lambda r, v: ""),
    ("created_at", lambda r, v: v[:16]), ("case_id", lambda r, v: None), ("event_id", lambda r, v: 12345),
    ("account_id", lambda r, v: " "), ("schema_version", lambda r, v: None),
]
_REQUIRED = {
    TRANSACTIONS: ["event_id", "event_time", "account_id", "merchant_id", "amount", "currency", "mcc", "channel",
                   "country", "schema_version"],
    LABELS: ["event_id", "label", "source", "labelled_at", "schema_version"],
    CASE_NOTES: ["case_id", "event_id", "account_id", "author", "text", "created_at", "schema_version"],
}


def _violate(rng: random.Random, topic: str, record: dict) -> tuple[dict, str]:
    """A copy of ``record`` breaking exactly one rule of its contract; returns it and the field broken."""
    broken = dict(record)
    if rng.random() < 0.2:  # a required field left out
        name = rng.choice(_REQUIRED[topic])
        del broken[name]
        return broken, name
    table = {TRANSACTIONS: _TXN_VIOLATIONS, LABELS: _LABEL_VIOLATIONS, CASE_NOTES: _NOTE_VIOLATIONS}[topic]
    candidates = [(n, f) for n, f in table if n in record and (record[n] is not None or n in ("amount",))]
    name, mutate = rng.choice(candidates)
    broken[name] = mutate(rng, record[name])
    return broken, name


# -- investigator notes -------------------------------------------------------------------------------------
_OPENERS = {
    "velocity_burst": "Case opened from the velocity alert ({n} online payments in {mins} min).",
    "account_takeover": "Case opened from a login-risk alert: new device, IP in {ip_country}.",
    "new_device_high_amount": "Case opened: high-amount alert on a device not seen before.",
    "country_mismatch": "Case opened from a geo alert: card used in {country}.",
    "risky_merchant": "Case opened: payment to a watch-listed {category} merchant.",
    None: "Case opened for manual review ({reason}).",
}
_CONCLUSIONS = {
    "velocity_burst": [
        "Customer has the card and denies all {n} purchases made within {mins} minutes at different online "
        "shops. Device {device} is unknown to us. Card blocked and reissued; fraud confirmed.",
        "Classic card testing: small charges, then spend, {n} transactions in {mins} min from one device. "
        "Customer did not authorise them. Marked fraud, card replaced.",
        "Rapid burst of e-commerce charges from an IP in {ip_country}. Customer says card details were probably "
        "skimmed at a web shop. Confirmed fraud.",
    ],
    "account_takeover": [
        "Customer reports an SMS asking for their one-time code, then lost access. Login from device {device} "
        "and IP {ip} ({ip_country}), a small test payment and {transfers} transfers ('{memo}'). Account locked, "
        "credentials reset, recall requested. Account takeover: fraud confirmed.",
        "Password reset the customer did not request, followed by transfers to a new beneficiary with memo "
        "'{memo}'. Customer never used this device. ATO - fraud.",
        "Social engineering: caller pretended to be the bank and asked to move money to a 'safe account'. "
        "Session from {ip_country}. Fraud confirmed, customer educated.",
    ],
    "new_device_high_amount": [
        "Purchase about {ratio}x the customer's usual spend, from a device never seen on this account "
        "({channel}). Customer did not recognise it. Fraud confirmed, credentials reset.",
        "Customer denies the high-value order; the device fingerprint is new and the delivery address was "
        "changed the same day. Fraud.",
    ],
    "country_mismatch": [
        "Card-present use in {country} {gap} after a purchase in {home}. Customer is at home with the card: "
        "cloned card (skimming). Card blocked. Fraud.",
        "Impossible travel: {channel} transaction in {country} while the customer was in {home}. Customer "
        "confirms the card never left their wallet. Fraud confirmed.",
    ],
    "risky_merchant": [
        "Merchant {merchant} ({category}) is on our watch list with several open disputes. Customer does not "
        "know the merchant and never ordered anything. Fraud.",
        "Customer disputes the {category} payment: no such subscription or order. Merchant linked to other "
        "complaints this month. Marked fraud, merchant escalated.",
    ],
    "travel": [
        "Customer confirmed they are travelling in {country} this week. Transaction legitimate, travel flag "
        "added.",
        "Spoke to the customer: on holiday abroad ({country}), all recent payments are theirs. No fraud.",
    ],
    "new_device": [
        "Customer got a new phone and confirmed the purchase in the app. Legitimate.",
        "New device explained: customer replaced their laptop last week. Purchase confirmed, closed as "
        "legitimate.",
    ],
    "large_purchase": [
        "Large {category} purchase of {amount} {currency} confirmed by the customer on a call. No fraud.",
        "Customer confirms the big-ticket order (planned purchase). Legitimate.",
    ],
    "risky_merchant_legit": [
        "Merchant is on the watch list, but the customer confirms a genuine purchase they expected. Closed as "
        "legitimate.",
    ],
    None: [
        "Routine review: customer confirmed the transaction. No further action.",
        "Reviewed against history; amount, place and device are typical for this customer. Legitimate.",
        "Customer recognised the payment after checking their statement. Closed, not fraud.",
    ],
}
_FILLERS = ["Left a voicemail first.", "Customer verified via the app.", "Called back within the hour.",
            "Checked with the merchant.", "Customer was cooperative.", "Statement reviewed for the last 30 days."]


def _case_texts(rng: random.Random, txn: _Txn) -> list[str]:
    key = txn.pattern if txn.is_fraud else txn.decoy
    record, detail = txn.record, dict(txn.detail)
    gap = detail.get("gap_min")
    slots = {
        "n": "several", "mins": "a few", "device": record.get("device_id") or "unknown", "ip": record.get("ip"),
        "ip_country": "abroad", "transfers": "several", "memo": record.get("memo") or "transfer",
        "ratio": "10", "channel": record["channel"].replace("_", "-"), "country": record["country"],
        "home": txn.account.home, "merchant": record["merchant_id"], "category": _CATEGORY[record["mcc"]],
        "amount": record["amount"], "currency": record["currency"],
        "reason": rng.choice(["random sample", "customer call", "amount above threshold", "model score"]),
        **{k: v for k, v in detail.items() if v is not None},
        "gap": f"{gap} minutes" if gap is not None else "shortly",
    }
    closing = rng.choice(_CONCLUSIONS[key]).format(**slots)
    if rng.random() < 0.3:
        closing = f"{rng.choice(_FILLERS)} {closing}"
    notes = [closing]
    if rng.random() < 0.6:
        notes.insert(0, _OPENERS.get(key if txn.is_fraud else None, _OPENERS[None]).format(**slots))
    if rng.random() < 0.2:
        notes.insert(1, rng.choice(_FILLERS))
    return notes


# -- public helpers -----------------------------------------------------------------------------------------
def generate(config: GeneratorConfig | None = None, **overrides) -> Iterator[Message]:
    """Messages of one run in produce order; ``generate(events=1000, seed=7)`` is shorthand for a config."""
    config = replace(config, **overrides) if config else GeneratorConfig(**overrides)
    return iter(EventGenerator(config))


def default_bootstrap_servers(conn_id: str = "kafka_default") -> tuple[str, str]:
    """
    ``bootstrap.servers`` to use when none is given, and where it came from.

    1. the ``AIRFLOW_CONN_KAFKA_DEFAULT`` environment variable (JSON or URI form), without importing Airflow;
    2. the ``kafka_default`` connection through Airflow, only when Airflow is configured (``AIRFLOW_HOME`` is
       set) and answers - any failure is ignored;
    3. ``127.0.0.1:<kafka port>`` of the local stack (``DECISIONFLOW_KAFKA_PORT``, default 9092).
    """
    env = os.environ.get(f"AIRFLOW_CONN_{conn_id.upper()}")
    if env:
        servers = _servers_from_conn_env(env)
        if servers:
            return servers, f"env AIRFLOW_CONN_{conn_id.upper()}"
    if os.environ.get("AIRFLOW_HOME"):
        servers = _servers_from_airflow(conn_id)
        if servers:
            return servers, f"Airflow connection {conn_id}"
    from decisionflow import config

    return f"{config.HOST}:{config.port('kafka')}", "local stack default"


def _servers_from_conn_env(value: str) -> str | None:
    try:
        if value.lstrip().startswith("{"):
            conn = json.loads(value)
            extra = conn.get("extra") or {}
            extra = json.loads(extra) if isinstance(extra, str) else extra
            if extra.get("bootstrap.servers"):
                return str(extra["bootstrap.servers"])
            if conn.get("host"):
                return f"{conn['host']}:{conn.get('port') or 9092}"
            return None
        from urllib.parse import parse_qs, urlsplit

        parts = urlsplit(value)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        if query.get("bootstrap.servers"):
            return query["bootstrap.servers"]
        if "__extra__" in query:
            extra = json.loads(query["__extra__"])
            if extra.get("bootstrap.servers"):
                return str(extra["bootstrap.servers"])
        return f"{parts.hostname}:{parts.port or 9092}" if parts.hostname else None
    except (ValueError, TypeError, AttributeError):
        return None


def _servers_from_airflow(conn_id: str) -> str | None:
    try:
        import logging

        logging.getLogger("airflow").setLevel(logging.ERROR)
        try:
            from airflow.sdk import BaseHook  # inside a task: through the supervisor

            conn = BaseHook.get_connection(conn_id)
        except Exception:  # noqa: BLE001 - outside a task the SDK only sees env vars: ask the metastore
            from airflow.models.connection import Connection

            conn = Connection.get_connection_from_secrets(conn_id)
        servers = (conn.extra_dejson or {}).get("bootstrap.servers")
        return str(servers) if servers else None
    except Exception:  # noqa: BLE001 - Airflow is optional here; fall back to the local default
        return None


# -- command line -------------------------------------------------------------------------------------------
def _start_time(text: str) -> datetime:
    if text == "now":
        now = int(time.time()) // 60 * 60
        return datetime.fromtimestamp(now, tz=timezone.utc)
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="decisionflow", description="Seeded transaction-risk event generator.")
    sub = parser.add_subparsers(dest="command", required=True)
    produce = sub.add_parser(
        "produce", help="generate events and produce them to Kafka, writing the ground truth",
        description="Generate a seeded stream (transactions, labels, case notes, bad input) and produce it to "
                    "Kafka (idempotent, acks=all, keyed by account_id). The truth file gets one JSON line per "
                    "message (topic, partition, offset, kind, event_id, is_fraud, pattern, ...) in produce "
                    "order; a <truth>.summary.json next to it has the counts.",
    )
    produce.add_argument("--events", type=int, default=10_000, help="transactions to generate (default 10000)")
    produce.add_argument("--rate", type=float, default=0.0,
                         help="messages per second across all topics; 0 = as fast as possible (default)")
    produce.add_argument("--seed", type=int, default=0, help="seed: same seed, same messages (default 0)")
    produce.add_argument("--bad-share", type=float, default=0.05,
                         help="expected share of bad-input messages, 0..0.5 (default 0.05)")
    produce.add_argument("--bootstrap-servers", default=None,
                         help="HOST:PORT; default from the kafka_default Airflow connection when available, "
                              "else 127.0.0.1:9092")
    produce.add_argument("--truth", type=Path, default=None,
                         help="ground-truth JSON lines (default $DECISIONFLOW_DATA/generator/truth-seed<S>.jsonl)")
    produce.add_argument("--topics", nargs="+", choices=SOURCE_TOPICS, default=list(SOURCE_TOPICS),
                         help="topics to produce (default: all three)")
    produce.add_argument("--create-topics", action="store_true",
                         help="create missing topics and their .dlq topics with the defaults of contracts.TOPICS")
    produce.add_argument("--start", type=_start_time, default=_DEFAULT_START,
                         help="simulated start, ISO 8601 or 'now' (default 2025-01-06T00:00:00Z)")
    produce.add_argument("--days", type=float, default=14.0, help="simulated span of transactions (default 14)")
    produce.add_argument("--fraud-rate", type=float, default=1.0, help="multiplier on fraud rates (default 1)")
    produce.add_argument("--no-progress", action="store_true", help="no progress bar")
    produce.add_argument("--dry-run", action="store_true",
                         help="generate and write the truth file (partition/offset null) without Kafka")
    return parser


def main(argv: list[str] | None = None) -> int:
    """
    ``produce --events N --rate R --seed S --bad-share F --bootstrap-servers HOST:PORT --truth PATH
    [--topics ...] [--create-topics]``; the leading ``produce`` may be left out. Returns the exit code:
    0 all acknowledged, 1 Kafka trouble or unacknowledged messages, 2 usage error.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "produce":
        argv = ["produce", *argv]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on usage errors
        return int(exc.code or 0)
    try:
        config = GeneratorConfig(events=args.events, seed=args.seed, bad_share=args.bad_share,
                                 topics=tuple(args.topics), start=args.start, days=args.days,
                                 fraud_rate=args.fraud_rate)
    except ValueError as exc:
        print(f"decisionflow produce: {exc}", file=sys.stderr)
        return 2
    if args.rate < 0:
        print("decisionflow produce: --rate must be >= 0", file=sys.stderr)
        return 2
    truth = args.truth
    if truth is None:
        from decisionflow.config import data_dir

        truth = data_dir() / "generator" / f"truth-seed{args.seed}.jsonl"

    from decisionflow.risk import producer

    if args.dry_run:
        servers, source = None, "dry run"
    elif args.bootstrap_servers:
        servers, source = args.bootstrap_servers, "--bootstrap-servers"
    else:
        servers, source = default_bootstrap_servers()
    print(f"decisionflow produce: {config.events} transactions, seed {config.seed}, bad share {config.bad_share}, "
          f"topics {list(config.topics)} -> {servers or '(no Kafka)'} [{source}]", file=sys.stderr)
    try:
        if servers and args.create_topics:
            created = producer.ensure_topics(servers, config.topics)
            made = [name for name, new in created.items() if new]
            print(f"topics: created {made or 'none'}, all present: {sorted(created)}", file=sys.stderr)
        report = producer.produce(EventGenerator(config), bootstrap_servers=servers, truth_path=truth,
                                  rate=args.rate, progress=not args.no_progress)
    except producer.ProduceError as exc:
        print(f"decisionflow produce FAILED: {exc}", file=sys.stderr)
        return 1
    print(report.describe(), file=sys.stderr)
    return 0 if report.failed == 0 else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
