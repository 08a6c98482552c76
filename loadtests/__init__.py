"""`forseti loadtest`: the locust users and their runner, installed as `forseti.loadtests`.
The benchmark scripts live in benchmarks/ (not installed)."""
