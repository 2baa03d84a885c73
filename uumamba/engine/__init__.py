"""uumamba.engine."""
