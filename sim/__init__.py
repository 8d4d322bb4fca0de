"""spendtap.sim."""
