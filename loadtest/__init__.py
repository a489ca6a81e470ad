"""The load tools: benchmarks, the 50,000-buyer demo and its driver, the locust spike."""
