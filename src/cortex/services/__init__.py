"""Long-running services held by one node at a time, with takeover and giveback between HA partners."""
