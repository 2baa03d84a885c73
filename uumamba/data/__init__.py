"""uumamba.data."""
