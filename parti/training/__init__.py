"""The training infrastructure shared by both stages."""
