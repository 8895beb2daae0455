"""gRPC servicers and the one place where errors become statuses."""
