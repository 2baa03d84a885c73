"""uumamba.export."""
