"""spendtap.cli."""
