"""Text and task data."""
