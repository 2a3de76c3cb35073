"""`kiln serve`: an OpenAI-compatible HTTP server over the kiln runtime (FastAPI + uvicorn)."""
