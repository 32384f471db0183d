"""Policy: routing and balancing decisions, pure; time and randomness come in as parameters."""
