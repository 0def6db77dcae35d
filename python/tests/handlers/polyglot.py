"""The Python half of the polyglot workflow (tests/polyglot/templates/order_score.yaml)."""

from __future__ import annotations

import os

from tasker_core import StepHandler


class Score(StepHandler):
    """Twice the order's value, from the items Ruby fetched."""

    def call(self, task, sequence, step):
        fetched = sequence.get_result("fetch")
        return {
            "score": sum(fetched["items"]) * 2,
            "items_from": fetched["language"],
            "language": "python",
            "pid": os.getpid(),
        }


class Receipt(StepHandler):
    """The receipt line, from the total Ruby added up."""

    def call(self, task, sequence, step):
        total = sequence.get_result("total")
        return {
            "receipt": f"total {total['total']:.1f}",
            "total_from": total["language"],
            "language": "python",
            "pid": os.getpid(),
        }
