"""uumamba.nn.ops."""
