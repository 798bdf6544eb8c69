"""kata-monitor for pykata: discovers running sandboxes, scrapes each, serves Prometheus metrics."""
