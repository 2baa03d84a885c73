"""uumamba.inference."""
