"""smsbatch: batch rapid-fire inbound SMS and answer each burst with one AI reply."""

__version__ = "0.1.0"
