"""uumamba.losses."""
