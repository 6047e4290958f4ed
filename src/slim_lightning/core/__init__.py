"""Pure-torch compression core."""
