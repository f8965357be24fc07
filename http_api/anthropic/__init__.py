"""Anthropic's Messages API over the same spool: its request and response shapes, and
the routes that translate them."""
