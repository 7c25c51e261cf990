"""Small apps that multi-process tests run with ``serve_process`` (one uvicorn process each)."""
