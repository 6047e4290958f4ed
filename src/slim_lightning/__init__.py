"""SLiM compression framework."""
