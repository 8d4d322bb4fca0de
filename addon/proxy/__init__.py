"""The mitmproxy side: the addon's hooks and the request-path decisions they call
(principals, trust, budgets admission, spendtap's own answers)."""
