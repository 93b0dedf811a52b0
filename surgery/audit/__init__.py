"""Audit: what trains and which pass made it so (counting in count.py, formatting in format.py)."""

from surgery.audit.count import Audit, AuditRow, audit, format_totals

__all__ = ["Audit", "AuditRow", "audit", "format_totals"]
