"""The mitmproxy side: spendtap's addons (listed in ``addons``) and the request-path
decisions they call (principals, trust, budgets admission, spendtap's own answers)."""
