"""End-to-end recipes built on the library (kept apart from it): `demo`."""
