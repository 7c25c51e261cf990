"""The example app's data, kept in memory (a real app would use its database)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class Store:
    """Notifications per user, orders, document changes."""

    notifications: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    orders: list[dict[str, Any]] = field(default_factory=list)
    documents: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    _notification_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _order_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1001))

    def add_notification(self, user_id: str, title: str, body: str) -> dict[str, Any]:
        saved = {
            "id": next(self._notification_ids),
            "title": title,
            "body": body,
            "type": "info",
            "read": False,
            "createdAt": now_iso(),
        }
        self.notifications.setdefault(user_id, []).append(saved)
        return saved

    def mark_all_read(self, user_id: str) -> None:
        for item in self.notifications.get(user_id, []):
            item["read"] = True

    def unread_count(self, user_id: str) -> int:
        return sum(not n["read"] for n in self.notifications.get(user_id, []))

    def add_order(self, total: float, customer: str) -> dict[str, Any]:
        order = {"id": next(self._order_ids), "total": total, "customer": customer}
        self.orders.append(order)
        return order

    def stats(self, connections: int) -> dict[str, Any]:
        return {
            "orders": len(self.orders),
            "revenue": round(sum(o["total"] for o in self.orders), 2),
            "connections": connections,
            "updatedAt": now_iso(),
        }

    def add_change(self, doc_id: str, user_id: str, changes: str) -> dict[str, Any]:
        change = {"changes": changes, "userId": user_id, "timestamp": int(datetime.now(UTC).timestamp() * 1000)}
        self.documents.setdefault(doc_id, []).append(change)
        return change
