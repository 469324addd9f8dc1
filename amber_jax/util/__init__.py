"""Small infrastructure shared by every layer (progress bars)."""
