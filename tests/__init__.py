"""tracerl test suite: unit/ mirrors the package, e2e/ runs commands end to end, support/ holds
shared helpers (import them as tests.support.NAME)."""
