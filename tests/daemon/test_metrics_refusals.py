"""The disk tier's refusals are exported by cause (admission, write-back buffer full, write budget, degraded),
its errors by kind (a full disk or index apart from other I/O errors), and whether it admits."""

from __future__ import annotations

from typing import Any

from kvtier.daemon.metrics import _store_families


def test_disk_refusals_are_exported_by_cause() -> None:
    tier = {"hit_blocks": 0, "bytes_read": 0, "bytes_written": 0, "evicted_blocks": 0, "used_blocks": 0,
            "capacity_blocks": 1, "detail": {"admissions_rejected": 3, "busy_rejected": 5, "budget_rejected": 7,
                                             "degraded_rejected": 11, "disk_full_errors": 2, "io_errors": 1,
                                             "admitting": False, "fault": "full"}}
    stats: dict[str, Any] = {name: 0 for name in ("lookups", "miss_blocks", "put_blocks", "put_deduplicated_blocks",
                                                  "put_failed_blocks", "get_blocks", "get_failed_blocks",
                                                  "write_through_skipped_blocks", "write_through_failed_blocks")}
    stats["tiers"] = {"host": {**tier, "detail": {}}, "disk": tier}
    families = {family.name: family for family in _store_families(stats)}
    refused = {sample.labels["cause"]: sample.value for sample in families["kvtier_disk_refused_blocks"].samples}
    assert refused == {"admission": 3, "buffer_full": 5, "over_budget": 7, "degraded": 11}
    assert families["kvtier_admissions_rejected"].samples[0].value == 26
    errors = {sample.labels["kind"]: sample.value for sample in families["kvtier_disk_errors"].samples}
    assert errors == {"full": 2, "io": 1}
    (admitting,) = families["kvtier_disk_admitting"].samples
    assert (admitting.labels, admitting.value) == ({"fault": "full"}, 0)
