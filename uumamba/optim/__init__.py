"""uumamba.optim."""
