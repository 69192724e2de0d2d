"""tend's built-in plugins, each built only on tend's public API."""
