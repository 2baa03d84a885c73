"""uumamba.evaluation."""
