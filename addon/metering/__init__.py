"""Reading the traffic: request facts, stream framing, decoding, the usage scanners and one
flow's metering state (pure: no mitmproxy, no click)."""
