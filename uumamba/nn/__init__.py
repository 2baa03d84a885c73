"""uumamba.nn."""
