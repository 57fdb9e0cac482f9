"""Tools around the router, never imported by the scorer or the service: the scoring and serving benchmarks, the
soak, the fake OpenAI-compatible provider, the servers-in-a-thread the tests and benchmarks use, and the generator of
serving/CONFIG.md."""
