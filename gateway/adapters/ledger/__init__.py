"""The ledger: SQLite (one gateway, group commit) or PostgreSQL (several gateways), one core for both."""

from gateway.adapters.ledger.base import LedgerClosedError
from gateway.adapters.ledger.postgres import PostgresLedger
from gateway.adapters.ledger.sqlite import SWITCH_INTERVAL_S, SqliteLedger

__all__ = ["SWITCH_INTERVAL_S", "LedgerClosedError", "PostgresLedger", "SqliteLedger"]
