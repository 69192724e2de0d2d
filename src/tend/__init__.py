"""tend."""
