"""`make bench`: parti against the public parti-pytorch, side by side in one process (compare.py)."""
