"""End-to-end tests: the example app in a real browser."""
