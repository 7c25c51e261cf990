"""Small helpers shared by the tests: real SSE clients and test apps."""
