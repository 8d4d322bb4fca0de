"""What Prometheus reads: the sidecar's metric families, budget gauges read at scrape time,
and the metrics port."""
