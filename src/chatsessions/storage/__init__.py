"""Storage backends behind the `SessionRepository` protocol."""
