"""Load tests and benchmark scripts, installed as `forseti.loadtests` (`forseti loadtest`)."""
