"""uumamba REST inference service (FastAPI + uvicorn); installed as `uumamba_service`."""
