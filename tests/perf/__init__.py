"""Performance guards that count work instead of timing it."""
