"""A worker process: its epoll loop and the parts that serve clients."""
