"""The monitor's defaults, apart from the modules that use them: `pykata --help` and every other
command build the `monitor` options without importing prometheus_client and the scraper."""

DEFAULT_LISTEN = "127.0.0.1:8090"  # kata-monitor's port
DEFAULT_TIMEOUT = 2.0  # seconds one sandbox's agent has to answer
PSS_MAX_AGE = 30.0  # seconds a VM's PSS is reused before its page tables are walked again
DEFAULT_INTERVAL = 5.0  # seconds between two collections
