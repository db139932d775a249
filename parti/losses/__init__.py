"""Stage-1 losses."""
