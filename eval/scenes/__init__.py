"""Data generators for tests, the demo and the reference teacher."""
